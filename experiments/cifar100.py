"""CIFAR-100, ResNet-164 with any step-size controller; the paper protocol or a variant.

``cifar100:controller=NAME,variant=NAME[,option=value...]``, as for `cifar10`: `controller`
default ``constant`` (plain ResNet); `variant` ``''`` (paper protocol), ``smoke``, ``cpu`` or
``deep``; other keys are options of the controller. See `stepjax.protocols`.
"""

from stepjax.protocols import cifar


def get_config(arg=None):
    return cifar("cifar100", arg)
