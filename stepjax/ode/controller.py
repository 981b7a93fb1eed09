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

An ODE solver with an error estimate needs one thing more: to judge a step after trying it, and to
reject it. `ErrorStepController` adds that half (``judge_step``, from the step's `StepAttempt`) to
the same protocol; the choice of the next step stays ``adapt_step_size`` from the point reached.
Both run inside ``diffrax.diffeqsolve`` through `stepjax.ode.DiffraxStepController`.
"""

from __future__ import annotations

import abc
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import optimistix as optx
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


def spatial_mean(x):
    """Global average pool of an NHWC tensor to ``(B, C)`` in float32."""
    return x.astype(jnp.float32).mean(axis=(1, 2))


def as_channel_step(gate):
    """A ``(B, C)`` gate as a per-channel step ``(B, 1, 1, C)``."""
    return gate[:, None, None, :]


class ChannelAffine(NamedTuple):
    """A field's value as a per-channel affine map of a feature: ``f = scale * z + shift``.

    A post-activation residual branch ends in BatchNorm, which is such a map (its batch statistics
    fixed); a field that can say so has ``affine_output(y) -> ChannelAffine``. For a `ChannelGate`
    the Euler step is then ``g(base + (h scale) z + h shift)`` with ``GAP(f) = scale GAP(z) + shift``:
    ``f`` is never formed, and on XLA's CPU backend the step reads its block's output as often as
    a plain one does (docs/BENCHMARKS.md, "The channel gate folded into the step").

    - `z`: the feature, ``(B, H, W, C)``.
    - `scale`, `shift`: per channel, ``(C,)``, or scalars (`identity`); `value` also takes them
      per example and channel, ``(B, 1, 1, C)`` (the step ``h`` times the map, `EulerStep`).
    """

    z: jax.Array
    scale: jax.Array
    shift: jax.Array

    @classmethod
    def identity(cls, f):
        """`f` itself as a `ChannelAffine` (scale 1, shift 0)."""
        return cls(f, jnp.float32(1.0), jnp.float32(0.0))

    def value(self):
        """``f`` itself."""
        return (self.scale * self.z + self.shift).astype(self.z.dtype)

    def spatial_mean(self):
        """``GAP(f)``, ``(B, C)`` float32, from ``GAP(z)`` (scale and shift per channel)."""
        return self.scale * spatial_mean(self.z) + self.shift


class ChannelGate(StepController):
    """Abstract base class of the controllers that choose one step per example and channel from
    per-channel spatial statistics of the field (``GAP(f0)`` for SE, ECA and DIA; StepNet's
    moments), never from ``f0`` pixel by pixel: ``h = gate(t0, y0, f0, controller_state)`` with
    ``f0`` a `ChannelAffine`.

    That lets an `EulerStep` whose field ends in a per-channel affine map take the step without
    forming ``f0`` at all (`EulerStep.folds_field`); elsewhere ``f0`` is `ChannelAffine.identity`.
    """

    def adapt_step_size(self, t0, y0, f0, controller_state):
        gate, controller_state = self.gate(t0, y0, ChannelAffine.identity(f0), controller_state)
        return as_channel_step(gate), controller_state

    @abc.abstractmethod
    def gate(self, t0, y0, f0, controller_state, *, nonnegative_state=False) -> tuple[jax.Array, ControllerState]:
        """The step from the field's per-channel statistics.

        **Arguments:**

        - `t0`, `y0`, `controller_state`: as for `adapt_step_size`.
        - `f0`: the field as a `ChannelAffine` (its `spatial_mean` is ``GAP(f0)``).
        - `nonnegative_state`: every element of `y0` is >= 0 (`EulerStep`'s `nonnegative_state`);
          a gate that reads `y0` may use it, the others ignore it.

        **Returns:**

        A pair `(h, controller_state)` with `h` of shape ``(B, C)``.
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


def scaled_norm(norm, rtol, atol, y0, y1_candidate, tree) -> jax.Array:
    """``norm(tree / (atol + rtol * max(|y0|, |y1_candidate|)))``, diffrax's error scaling.

    **Arguments:**

    - `norm`: a norm of pytrees, e.g. `optimistix.rms_norm`.
    - `rtol`, `atol`: tolerances.
    - `y0`, `y1_candidate`: the step's start and proposed end; a candidate with a NaN is replaced by
      `y0` in the scale (the solver stepped where the field is undefined).
    - `tree`: what to measure, e.g. the error estimate.

    **Returns:**

    The scalar norm, operation for operation as `diffrax.PIDController` scales its error.
    """

    def scale(_y0, _y1, _x):
        _y1 = jnp.where(jnp.isnan(_y1).any(), _y0, _y1)
        _y = jnp.maximum(jnp.abs(_y0), jnp.abs(_y1))
        with jax.numpy_dtype_promotion("standard"):
            return _x / (atol + _y * rtol)

    return norm(jtu.tree_map(scale, y0, y1_candidate, tree))


class StepAttempt(NamedTuple):
    """An attempted step as an `ErrorStepController` judges it (diffrax's `adapt_step_size` inputs).

    - `t0`, `t1`: the step's interval.
    - `y0`, `y1_candidate`: the state at `t0` and the proposed state at `t1`.
    - `args`: the vector field's arguments.
    - `y_error`: the solver's estimate of the local error of `y1_candidate`.
    - `error_order`: the order of that estimate.
    - `f0`, `f1`: the vector field at `(t0, y0)` and `(t1, y1_candidate)` for a controller that
      `uses_vector_field` (one evaluation per attempt plus one at the start, which the caller
      counts), else None.
    """

    t0: jax.Array
    t1: jax.Array
    y0: Any
    y1_candidate: Any
    args: Any
    y_error: Any
    error_order: Any
    f0: Any = None
    f1: Any = None


class ErrorStepController(StepController):
    """A `StepController` that judges each attempted step by its error estimate and may reject it.

    A step of an adaptive ODE solver is decided in two halves. `judge_step` sees the `StepAttempt`
    (the step's error estimate above all), accepts or rejects it, and records in the controller
    state what it needs; `adapt_step_size` then picks the size of the next attempt from the point
    reached, a priori, as a network block's controller does. Differences from the network case:

    - ``t0`` of `adapt_step_size` is the time, not a step index; ``y0`` is the solver's state
      without a batch axis (one controller per solve);
    - ``f0`` is the vector field at ``y0`` when `uses_vector_field`, else None: no evaluation is
      spent on a controller that does not read it;
    - the first step size is the caller's ``dt0`` (a starting-step rule), not a decision.

    **Arguments:**

    - `rtol`, `atol`: tolerances, kept as float64 NumPy arrays in `nnx.Variable`s so that one
      compilation serves every tolerance.
    - `norm`: the norm of the scaled error, as diffrax's (default `optimistix.rms_norm`).

    A subclass whose decisions read the vector field sets ``uses_vector_field = True``.
    """

    uses_vector_field: bool = False

    def __init__(self, rtol, atol, *, norm: Callable = optx.rms_norm):
        self.rtol = nnx.Variable(np.asarray(rtol, dtype=np.float64))
        self.atol = nnx.Variable(np.asarray(atol, dtype=np.float64))
        self.norm = norm

    def scaled_norm(self, attempt: StepAttempt, tree) -> jax.Array:
        """**Returns:** `scaled_norm` of `tree` (e.g. ``attempt.y_error``) at the attempt's scale."""
        return scaled_norm(self.norm, self.rtol[...], self.atol[...], attempt.y0, attempt.y1_candidate, tree)

    @abc.abstractmethod
    def judge_step(self, attempt: StepAttempt, controller_state: ControllerState) -> tuple[jax.Array, ControllerState]:
        """Accept or reject an attempted step.

        **Arguments:**

        - `attempt`: the `StepAttempt`.
        - `controller_state`: the state after the previous `adapt_step_size` (or `init`).

        **Returns:**

        A pair `(keep_step, controller_state)`; the state goes on to `adapt_step_size`.
        """
