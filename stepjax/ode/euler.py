"""`EulerStage`: a stage of residual blocks as explicit Euler steps ``y <- P(y) + h * f(y)``."""

from __future__ import annotations

import math
import os
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from stepjax import kernels
from stepjax.ode.controller import ChannelAffine, ChannelGate, StageShared, StepController, as_channel_step

# Inside the scan over a stage's blocks, only values a vector field tags with
# `jax.ad_checkpoint.checkpoint_name(x, SAVED)` (the outputs of the ResNet fields' 3x3 and larger
# convolutions; a 1x1 convolution is redone, `stepjax.layers.conv2d`) are
# stored for the backward pass; the elementwise rest of a step (BatchNorm, ReLU, the step-size
# update) is recomputed from them. Same gradients; about half the stored activations, fewer
# memory passes, and on 2 CPU cores a faster step. ``STEPJAX_REMAT=0`` turns it off. On the CPU the
# stored values are not copied to round them to their own precision (`kernels.drop_exact_reduce_precision`).
SAVED = "euler_saved"
_SMALL = 1 << 20  # elements: a reduction's output up to this size is stored, not recomputed
_REDUCTIONS = (jax.lax.reduce_sum_p, jax.lax.reduce_max_p, jax.lax.reduce_min_p)


def _save_policy(prim, *avals, **params):
    """Store the tagged values and the small outputs of reductions (BatchNorm statistics, a
    controller's pooled features): recomputing those would read whole activations again."""
    if prim in _REDUCTIONS:
        shape = avals[0].shape
        kept = [n for i, n in enumerate(shape) if i not in params.get("axes", ())]
        return math.prod(kept) <= _SMALL
    return _SAVE_NAMED(prim, *avals, **params)


_SAVE_NAMED = jax.checkpoint_policies.save_only_these_names(SAVED)


class StepProposal(NamedTuple):
    """What a step computes before it moves (`EulerStep.propose`).

    - `base`: ``P(y0)``, the point the step starts from (``y0`` when the step keeps its shape).
    - `f0`: ``f(y0)``.
    - `h`: the controller's step size (1 where the controller is off), broadcastable to `f0`.
    - `controller_state`: the controller state after this step.
    """

    base: jax.Array
    f0: jax.Array
    h: jax.Array
    controller_state: object


class EulerStep(nnx.Module):
    """One explicit Euler step ``y1 = P(y0) + h * f(y0)``, projected by ``g`` if given.

    Taken as ``advance(propose(...))``: `propose` evaluates the field and asks the controller for
    ``h``, `advance` moves; whoever needs the pieces (the stiffness analysis records ``f0`` and
    ``h``, and may replace ``h``) calls the two in turn.

    **Arguments:**

    - `vector_field`: a module with ``f(y) -> dy`` (never ``y + dy``).
    - `controller`: the `StepController` that picks ``h``.
    - `change_of_variables`: ``P`` for a shape-changing step (a shortcut projection), else None
      (identity).
    - `projection`: ``g`` applied after the update, e.g. ``jax.nn.relu`` for post-activation
      networks (projected Euler onto the non-negative orthant); None for plain Euler.
    - `nonnegative_state`: the state entering the step lies in the non-negative orthant (a
      post-activation network, whose stem and steps all end in a ReLU). A step that keeps the
      state's shape tells its `ChannelGate` so when it folds the field (StepNet's gradient into
      the state is then one value per example and channel); a shape-changing step's ``P(y0)``
      need not lie there.
    """

    def __init__(
        self,
        vector_field: nnx.Module,
        controller: StepController,
        *,
        change_of_variables: nnx.Module | None = None,
        projection: Callable[[jax.Array], jax.Array] | None = None,
        nonnegative_state: bool = False,
    ):
        self.vector_field = vector_field
        self.controller = controller
        self.change_of_variables = change_of_variables
        self.projection = projection
        self.nonnegative_state = nonnegative_state

    def __call__(self, y0, controller_state, t0, active=True):
        """Take the step.

        **Arguments:**

        - `y0`: the current state.
        - `controller_state`: the carried controller state, or None to start one with
          `controller.init` (first step of a stage).
        - `t0`: the step's index within the stage.
        - `active`: where false, the controller's step is replaced by 1 (placement mask).

        **Returns:**

        `(y1, controller_state, h)`.
        """
        if self.folds_field:
            return self._folded(y0, controller_state, t0, active)
        proposal = self.propose(y0, controller_state, t0, active)
        return self.advance(proposal.base, proposal.h, proposal.f0), proposal.controller_state, proposal.h

    @property
    def folds_field(self) -> bool:
        """Whether `__call__` takes the step without forming ``f0``: a `ChannelGate` controller and a
        field with an ``affine_output`` (`ChannelAffine`). The same step as `propose` then `advance`
        up to float32 rounding; the stiffness analysis, which reads ``f0``, takes it that way."""
        return isinstance(self.controller, ChannelGate) and getattr(self.vector_field, "affine_output", None) is not None

    def _folded(self, y0, controller_state, t0, active):
        base = self._base(y0)
        if controller_state is None:
            controller_state = self.controller.init(base)
        f0 = self.vector_field.affine_output(y0)
        gate, controller_state = self.controller.gate(
            t0, base, f0, controller_state, nonnegative_state=self.nonnegative_state and self.change_of_variables is None
        )
        h = as_channel_step(self._masked(gate, active))
        y1 = base + ChannelAffine(f0.z, h * f0.scale, h * f0.shift).value().astype(base.dtype)
        return self._project(y1), controller_state, h

    def propose(self, y0, controller_state, t0, active=True) -> StepProposal:
        """Everything the step computes before it moves; arguments as for `__call__`.

        **Returns:**

        A `StepProposal`.
        """
        base = self._base(y0)
        if controller_state is None:
            controller_state = self.controller.init(base)
        f0 = self.vector_field(y0)
        h, controller_state = self.controller.adapt_step_size(t0, base, f0, controller_state)
        return StepProposal(base, f0, self._masked(h, active), controller_state)

    def advance(self, base, h, f0):
        """The state after the step, ``g(base + h * f0)``: the proposal's pieces, or any other `h`."""
        return self._project(base + (h * f0).astype(base.dtype))

    def _base(self, y0):
        return y0 if self.change_of_variables is None else self.change_of_variables(y0)

    @staticmethod
    def _masked(h, active):
        return h if active is True else jnp.where(active, h, jnp.ones_like(h))

    def _project(self, y1):
        return y1 if self.projection is None else self.projection(y1)


class StageOutput(NamedTuple):
    """What a stage solve records per step (leading axis: step within the stage).

    - `step_size`: ``h`` averaged over all axes but batch and channel, shape ``(K, B, C)``.
    - `states`: the state entering each shape-preserving step, ``(K', *y.shape)`` (K' = K, or
      K - 1 when the first step changes shape), or None if not saved.
    """

    step_size: jax.Array
    states: jax.Array | None


def _summarise_step(h, f0):
    """Mean of the broadcast step size over every axis except batch and channel."""
    full = jnp.broadcast_to(h, f0.shape).astype(jnp.float32)
    return full.mean(axis=tuple(range(1, f0.ndim - 1)))


def build_stacked(make: Callable[[nnx.Rngs], nnx.Module], num: int, rngs: nnx.Rngs):
    """Build `num` independently initialised copies of a module, stacked on a leading axis.

    **Arguments:**

    - `make`: constructor taking an `nnx.Rngs`.
    - `num`: how many copies.
    - `rngs`: the random stream that seeds them.

    **Returns:**

    One module whose arrays carry a leading axis of size `num`.
    """
    keys = jax.random.split(rngs.params(), num)
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: make(nnx.Rngs(0))))
    states = jax.vmap(lambda key: nnx.state(make(nnx.Rngs(key))))(keys)
    return nnx.merge(graphdef, states)


class EulerStage(nnx.Module):
    """A stage of `num_steps` residual blocks solved as explicit Euler steps.

    If `transition` is true, step 0 changes shape (stride, width) through its own
    ``change_of_variables`` and is taken on its own; the remaining identical steps are stacked and
    run by one `jax.lax.scan`, so compile time does not grow with depth. Controller state flows
    from step to step through the scan carry.

    **Arguments:**

    - `make_step`: ``make_step(first: bool, rngs) -> EulerStep``.
    - `num_steps`: number of blocks in the stage.
    - `transition`: whether the first step changes shape.
    - `placement`: per-step booleans; where false the controller is off (step 1). None: all on.
    - `rngs`: random stream for initialisation.
    - `scan`: run the stacked steps with `jax.lax.scan` (default) or a Python loop.
    """

    def __init__(
        self,
        make_step: Callable[[bool, nnx.Rngs], EulerStep],
        num_steps: int,
        *,
        transition: bool,
        rngs: nnx.Rngs,
        placement: Sequence[bool] | None = None,
        scan: bool = True,
    ):
        if num_steps < 1 + int(transition):
            raise ValueError(f"EulerStage needs at least {1 + int(transition)} steps, got {num_steps}.")
        placement = (True,) * num_steps if placement is None else tuple(bool(p) for p in placement)
        if len(placement) != num_steps:
            raise ValueError(f"placement has {len(placement)} entries for a stage of {num_steps} steps.")
        self.placement = placement
        self.scan = scan
        self.first = make_step(True, rngs) if transition else None
        self.steps = build_stacked(lambda r: make_step(False, r), num_steps - int(transition), rngs)
        self._tie_shared()

    def _tie_shared(self):
        """Make every step use one copy of the controller's `StageShared` parameters."""
        stacked = self.steps.controller
        if not hasattr(stacked, "shared"):
            return
        if self.first is not None:
            stacked.shared = self.first.controller.shared
        else:
            nnx.update(stacked.shared, jax.tree.map(lambda a: a[0], nnx.state(stacked.shared)))

    def __call__(self, y):
        return self.solve(y)[0]

    def solve(self, y, *, save_states: bool = False):
        """Integrate the stage.

        **Arguments:**

        - `y`: the stage input.
        - `save_states`: also return the state entering every step (for stiffness analysis).

        **Returns:**

        `(y_out, StageOutput)`.
        """
        hs, state = [], None
        if self.first is not None:
            y, state, h = self.first(y, None, jnp.asarray(0), self.placement[0])
            hs.append(_summarise_step(h, y)[None])
        offset = int(self.first is not None)
        t0s = jnp.arange(offset, len(self.placement))
        active = jnp.asarray(self.placement[offset:])
        if state is None:
            state = self.step(0).controller.init(y)
        y, h_rest, states_rest = self._run_steps(y, state, t0s, active, save_states)
        hs.append(h_rest)
        step_size = jnp.concatenate(hs)
        return y, StageOutput(step_size, states_rest if save_states else None)

    @property
    def num_steps(self) -> int:
        """The number of steps (blocks) of the stage."""
        return len(self.placement)

    def step(self, k: int) -> EulerStep:
        """Step `k` of the stage (0-based) as a module of its own, for taking the stage one step
        at a time: ``step(k)(y, state, k, placement[k])`` for ``k`` in order, starting from state
        None, is `solve`. A step of the stack is a copy: what it changes (BatchNorm statistics in
        training mode) is not written back."""
        if not 0 <= k < self.num_steps:
            raise IndexError(f"step {k} of a stage of {self.num_steps} steps.")
        if self.first is not None:
            if k == 0:
                return self.first
            k -= 1
        graphdef, shared, stacked = self._split()
        return nnx.merge(graphdef, shared, jax.tree.map(lambda a: a[k], stacked))

    def _split(self):
        return nnx.split(self.steps, StageShared, ...)

    def _run_steps(self, y, state, t0s, active, save_states):
        graphdef, shared, stacked = self._split()

        def body(carry, xs):
            y, state = carry
            params, t0, on = xs
            step = nnx.merge(graphdef, shared, params)
            y_next, state, h = step(y, state, t0, on)
            saved = y if save_states else None
            return (y_next, state), (nnx.state(step, _MUTABLE), _summarise_step(h, y_next), saved)

        xs = (stacked, t0s, active)
        if os.environ.get("STEPJAX_REMAT", "1") != "0":
            kernels.drop_exact_reduce_precision()
            body = jax.checkpoint(body, policy=_save_policy, prevent_cse=False)
        if self.scan:
            (y, _), (new_stats, h, saved) = jax.lax.scan(body, (y, state), xs)
        else:
            outs = []
            for k in range(t0s.shape[0]):
                (y, state), out = body((y, state), jax.tree.map(lambda a: a[k], xs))
                outs.append(out)
            new_stats, h, saved = jax.tree.map(lambda *a: jnp.stack(a), *outs)
        nnx.update(self.steps, new_stats)
        return y, h, saved


# Variables a forward pass may change (BatchNorm statistics); parameters are never written back.
_MUTABLE = nnx.Not(nnx.Param)
