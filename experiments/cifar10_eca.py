"""CIFAR-10, ResNet-164 + ECA; paper protocol.

Variants: `cifar10_eca:smoke` (tiny, synthetic, seconds), `cifar10_eca:cpu` (2-core CPU protocol)."""

from _base import cifar


def get_config(arg=None):
    return cifar('cifar10', 'eca', arg)
