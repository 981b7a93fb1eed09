"""Attention modules as step-size controllers, selected by name.

``make_controller(name, channels, rngs=..., **options)`` builds the controller of one block.
"""

from __future__ import annotations

from stepjax.controllers.attention import CBAM, DIA, ECA, SRM, ChannelStep, DIACell, SqueezeExcitation, eca_kernel_size
from stepjax.controllers.stepnet import StepNet, step_features
from stepjax.errors import UserError
from stepjax.ode.controller import ConstantStepSize, LearnedStepSize

CONTROLLERS = {
    "constant": lambda channels, *, rngs, step_size=1.0: ConstantStepSize(step_size),
    "learned": lambda channels, *, rngs, init_value=1.0: LearnedStepSize(init_value),
    "se": SqueezeExcitation,
    "cbam": CBAM,
    "eca": ECA,
    "srm": SRM,
    "dia": DIA,
    "stepnet": StepNet,
    "channel_step": ChannelStep,
}


def make_controller(name: str, channels: int, *, rngs, **options):
    """Build the step-size controller `name` for a block of width `channels`.

    **Arguments:**

    - `name`: one of `CONTROLLERS`.
    - `channels`: width of the residual branch.
    - `rngs`: random stream.
    - `options`: keyword options of that controller (e.g. ``reduction``, ``history``).

    **Returns:**

    A `stepjax.ode.StepController`.
    """
    if name not in CONTROLLERS:
        raise UserError(f"Unknown controller {name!r}; choose one of {sorted(CONTROLLERS)}.")
    try:
        return CONTROLLERS[name](channels, rngs=rngs, **options)
    except TypeError as e:
        raise UserError(f"Bad options {options} for controller {name!r}: {e}") from e


__all__ = [
    "CBAM",
    "CONTROLLERS",
    "ChannelStep",
    "DIA",
    "DIACell",
    "ECA",
    "SRM",
    "SqueezeExcitation",
    "StepNet",
    "eca_kernel_size",
    "make_controller",
    "step_features",
]
