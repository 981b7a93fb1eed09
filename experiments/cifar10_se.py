"""CIFAR-10, ResNet-164 + SE as per-channel step-size controller; paper protocol.

Variants: `cifar10_se:smoke` (tiny, synthetic, seconds), `cifar10_se:cpu` (2-core CPU protocol)."""

from _base import cifar


def get_config(arg=None):
    return cifar('cifar10', 'se', arg)
