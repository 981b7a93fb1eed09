"""CIFAR-10, ResNet-164 + CBAM (channel x spatial step); paper protocol.

Variants: `cifar10_cbam:smoke` (tiny, synthetic, seconds), `cifar10_cbam:cpu` (2-core CPU protocol)."""

from _base import cifar


def get_config(arg=None):
    return cifar('cifar10', 'cbam', arg)
