"""The step-size controller protocol of a residual network read as an explicit Euler solver.

A residual stage computes ``y_{k+1} = y_k + h_k * f_k(y_k)``. A `StepController` picks ``h_k``.
The vocabulary follows diffrax (``init``, ``adapt_step_size``, a controller state carried from
step to step), with the differences that a network needs:

- the decision is *a priori*: there is no rejection, a network has a fixed graph;
- ``h`` is differentiable and may be a scalar, per sample ``(B,1,1,1)``, per channel
  ``(B,1,1,C)``, per location ``(B,H,W,1)`` or per element; it only has to broadcast against y;
- the controller receives the derivative ``f0 = f_k(y_k)`` itself rather than diffrax's
  ``y1_candidate = y0 + dt * f0``. Every block is a unit time step, so the two carry the same
  information; passing ``f0`` saves a subtraction and keeps ``h = 1`` bit-exact.
"""

from __future__ import annotations

import abc
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

ControllerState = Any


class StageShared(nnx.Param):
    """A parameter shared by every step of a stage (for instance DIA's LSTM cell).

    `EulerStage` builds its steps by vectorising a constructor over the block axis; variables of
    this type are then tied to one copy and broadcast, not stacked, by the scan over blocks.
    """


class StepController(nnx.Module, abc.ABC):
    """Abstract base class of all step-size controllers.

    One instance belongs to one step (block); an `EulerStage` stacks the instances of its blocks
    and scans over them. Sub-modules holding `StageShared` parameters must live in an attribute
    named ``shared`` so that the stage can tie them across its blocks.
    """

    def init(self, y0: jax.Array) -> ControllerState:
        """Controller state at the start of a stage.

        **Arguments:**

        - `y0`: the state at the start of the stage, already in the stage's coordinates (after
          the projection of a shape-changing first step).

        **Returns:**

        A pytree, carried from step to step. The default is the empty tuple (no memory).
        """
        del y0
        return ()

    @abc.abstractmethod
    def adapt_step_size(
        self, t0: jax.Array, y0: jax.Array, f0: jax.Array, controller_state: ControllerState
    ) -> tuple[jax.Array, ControllerState]:
        """Choose the step size of the current Euler step.

        **Arguments:**

        - `t0`: the index of the step within its stage (an integer scalar, possibly traced).
        - `y0`: the state the step starts from.
        - `f0`: the vector field at that state, `f_k(y0)`, same shape as `y0`.
        - `controller_state`: the state returned by the previous step (or by `init`).

        **Returns:**

        A pair `(h, controller_state)` where `h` broadcasts against `y0`.
        """


class ConstantStepSize(StepController):
    """A fixed step size. ``ConstantStepSize(1.0)`` is a plain residual network."""

    def __init__(self, step_size: float = 1.0):
        self.step_size = float(step_size)

    def adapt_step_size(self, t0, y0, f0, controller_state):
        del t0, y0, f0
        return jnp.asarray(self.step_size, dtype=jnp.result_type(float)), controller_state


class StepSchedule(StepController):
    """A fixed per-step schedule ``h_k = values[k]`` (not trained).

    **Arguments:**

    - `values`: one step size per step of the stage.
    """

    def __init__(self, values):
        self.values = nnx.Variable(jnp.asarray(values, dtype=jnp.float32))

    def adapt_step_size(self, t0, y0, f0, controller_state):
        del y0, f0
        return self.values[...][t0], controller_state


class LearnedStepSize(StepController):
    """A trained scalar step size of one step, ``h = init_value`` at initialisation.

    **Arguments:**

    - `init_value`: the initial step size.
    - `per_sample`: if true, ``h`` is broadcast to one value per sample ``(B,1,...,1)`` so that a
      per-sample controller and its bookkeeping can be exercised with the same parameter.
    """

    def __init__(self, init_value: float = 1.0, *, per_sample: bool = False):
        self.step_size = nnx.Param(jnp.asarray(init_value, dtype=jnp.result_type(float)))
        self.per_sample = per_sample

    def adapt_step_size(self, t0, y0, f0, controller_state):
        del t0, f0
        h = self.step_size[...]
        if self.per_sample:
            h = jnp.broadcast_to(h, (y0.shape[0],) + (1,) * (y0.ndim - 1))
        return h, controller_state
