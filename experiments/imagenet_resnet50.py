"""ImageNet, ResNet-50 with any step-size controller; 100 epochs, lr x0.1 at 30/60/90, batch 256.

``imagenet_resnet50:controller=NAME,variant=NAME[,option=value...]``: `controller` default
``constant`` (plain ResNet); `variant` ``''`` (this protocol) or ``smoke`` (tiny, synthetic,
seconds); other keys are options of the controller. See `stepjax.protocols`.
"""

from stepjax.protocols import imagenet


def get_config(arg=None):
    return imagenet(arg)
