"""ImageNet, ResNet-50 + StepNet (our reconstruction); 100 epochs.

Variants: `imagenet_resnet50_stepnet:smoke` (tiny, synthetic, seconds)."""

from _base import imagenet


def get_config(arg=None):
    return imagenet('stepnet', arg)
