"""CIFAR-10, ResNet-164 with any step-size controller; the paper protocol or a variant.

``cifar10:controller=NAME,variant=NAME[,option=value...]``: `controller` one of
`stepjax.CONTROLLERS` (default ``constant``, the plain ResNet with h = 1); `variant` ``''`` (the
paper protocol), ``smoke`` (tiny, synthetic, seconds), ``cpu`` (ResNet-20, the 2-core CPU
protocol) or ``deep`` (ResNet-164 at half width on CPU); other keys are options of the controller,
e.g. ``cifar10:controller=stepnet,history=False,variant=cpu``. See `stepjax.protocols`.
"""

from stepjax.protocols import cifar


def get_config(arg=None):
    return cifar("cifar10", arg)
