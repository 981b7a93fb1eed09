"""CIFAR-10, ResNet-164 + StepNet without history (ablation, our reconstruction).

Variants: `cifar10_stepnet_nohistory:smoke` (tiny, synthetic, seconds), `cifar10_stepnet_nohistory:cpu` (2-core CPU protocol)."""

from _base import cifar


def get_config(arg=None):
    return cifar('cifar10', 'stepnet', arg, history=False)
