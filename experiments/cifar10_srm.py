"""CIFAR-10, ResNet-164 + SRM; paper protocol.

Variants: `cifar10_srm:smoke` (tiny, synthetic, seconds), `cifar10_srm:cpu` (2-core CPU protocol)."""

from _base import cifar


def get_config(arg=None):
    return cifar('cifar10', 'srm', arg)
