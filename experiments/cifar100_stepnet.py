"""CIFAR-100, ResNet-164 + StepNet (our reconstruction); paper protocol.

Variants: `cifar100_stepnet:smoke` (tiny, synthetic, seconds), `cifar100_stepnet:cpu` (2-core CPU protocol)."""

from _base import cifar


def get_config(arg=None):
    return cifar('cifar100', 'stepnet', arg)
