"""CIFAR-100, ResNet-164, plain; paper protocol.

Variants: `cifar100_resnet:smoke` (tiny, synthetic, seconds), `cifar100_resnet:cpu` (2-core CPU protocol)."""

from _base import cifar


def get_config(arg=None):
    return cifar('cifar100', 'constant', arg)
