"""CIFAR-10, ResNet-164 + DIA (LSTM step controller shared by a stage); paper protocol.

Variants: `cifar10_dia:smoke` (tiny, synthetic, seconds), `cifar10_dia:cpu` (2-core CPU protocol)."""

from _base import cifar


def get_config(arg=None):
    return cifar('cifar10', 'dia', arg)
