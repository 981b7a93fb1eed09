"""CIFAR-10, ResNet-164 + StepNet (our reconstruction, with history); paper protocol.

Variants: `cifar10_stepnet:smoke` (tiny, synthetic, seconds), `cifar10_stepnet:cpu` (2-core CPU protocol)."""

from _base import cifar


def get_config(arg=None):
    return cifar('cifar10', 'stepnet', arg)
