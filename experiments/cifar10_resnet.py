"""CIFAR-10, ResNet-164, plain (constant step h=1); paper protocol.

Variants: `cifar10_resnet:smoke` (tiny, synthetic, seconds), `cifar10_resnet:cpu` (2-core CPU protocol)."""

from _base import cifar


def get_config(arg=None):
    return cifar('cifar10', 'constant', arg)
