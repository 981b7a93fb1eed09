"""CIFAR-100, ResNet-164 + SE; paper protocol.

Variants: `cifar100_se:smoke` (tiny, synthetic, seconds), `cifar100_se:cpu` (2-core CPU protocol)."""

from _base import cifar


def get_config(arg=None):
    return cifar('cifar100', 'se', arg)
