"""ImageNet, ResNet-50, plain; 100 epochs, lr x0.1 at 30/60/90, batch 256.

Variants: `imagenet_resnet50_resnet:smoke` (tiny, synthetic, seconds)."""

from _base import imagenet


def get_config(arg=None):
    return imagenet('constant', arg)
