"""Run a stepjax `StepController` as the step-size controller of `diffrax.diffeqsolve`."""

from __future__ import annotations

from typing import Any, Callable

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
from flax import nnx

from stepjax.ode.controller import ErrorStepController, StepAttempt, StepController


class DiffraxStepController(diffrax.AbstractStepSizeController):
    """A learned, a-priori step-size controller inside a diffrax solve.

    Each step is accepted (a network has no rejection). The step after ``[t0, t1]`` is chosen by
    the wrapped controller from the state ``y1`` and the slope of the step just taken,
    ``(y1 - y0) / (t1 - t0)``, which for explicit Euler is ``f(y0)``: no extra evaluation of
    the vector field. The first step uses ``f(y0)`` itself. ``y`` is presented to the controller
    with a leading batch axis of one, so a per-sample controller runs under `jax.vmap` of the
    solve; the chosen step must have a single element. Gradients flow to the controller's
    parameters through the step sizes (use `diffrax.RecursiveCheckpointAdjoint` or
    `DirectAdjoint`).

    An `ErrorStepController` (one that judges and may reject steps) runs through the subclass
    `DiffraxErrorController`; `from_module` picks the right one.

    Only forward integration is supported.

    **Arguments:**

    - `graphdef`, `params`: the controller split by `nnx.split`; build with `from_module`.
    """

    graphdef: Any = eqx.field(static=True)
    params: Any

    @classmethod
    def from_module(cls, controller: StepController) -> "DiffraxStepController":
        """**Returns:** the bridge for `controller`: a `DiffraxErrorController` for an
        `ErrorStepController`, else a `DiffraxStepController`."""
        graphdef, params = nnx.split(controller)
        if isinstance(controller, ErrorStepController):
            return DiffraxErrorController(graphdef, params)
        return DiffraxStepController(graphdef, params)

    def module(self) -> StepController:
        """**Returns:** the wrapped controller, rebuilt from `graphdef` and `params`."""
        return nnx.merge(self.graphdef, self.params)

    def _decide(self, index, y, f, state):
        h, state = self.module().adapt_step_size(index, y[None], f[None], state)
        if jnp.size(h) != 1:
            raise ValueError(
                f"DiffraxStepController needs one step size per solve, got shape {jnp.shape(h)}; "
                "vmap the solve over samples for a per-sample controller."
            )
        return jnp.reshape(h, ()), state

    def wrap(self, direction):
        return self

    def init(self, terms, t0, t1, y0, dt0, args, func, error_order):  # diffrax's signature
        del t1, dt0, error_order
        state = self.module().init(y0[None])
        h, state = self._decide(jnp.asarray(0), y0, func(terms, t0, y0, args), state)
        return t0 + h, (state, jnp.asarray(1))

    def adapt_step_size(self, t0, t1, y0, y1_candidate, args, y_error, error_order, controller_state):  # diffrax's signature
        del args, y_error, error_order
        state, index = controller_state
        slope = jax.tree.map(lambda a, b: (b - a) / (t1 - t0), y0, y1_candidate)
        h, state = self._decide(index, y1_candidate, slope, state)
        return True, t1, t1 + h, False, (state, index + 1), diffrax.RESULTS.successful


class DiffraxErrorController(DiffraxStepController, diffrax.AbstractAdaptiveStepSizeController):
    """An `ErrorStepController` inside a diffrax solve: steps are judged, and may be rejected.

    Each attempt goes to the controller's `judge_step` as a `StepAttempt`; from the point reached
    (the attempt's end if kept, else its start) `adapt_step_size` picks the next step. The first
    step is the solve's `dt0`, which must be given. A controller that `uses_vector_field` gets
    ``f`` at the start of every attempt and at its candidate end: the field must be attached with
    `bind`, and costs `extra_evaluations` evaluations. The tolerances are the controller's, so an
    implicit solver's root finder uses them as with a `diffrax.PIDController`.

    **Arguments:**

    - `graphdef`, `params`: as for `DiffraxStepController`; build with `from_module`.
    - `vector_field`: `f(t, y, args)`, attached by `bind`.
    """

    vector_field: Callable | None = eqx.field(static=True, default=None)

    @property
    def rtol(self):
        return self.module().rtol[...]

    @property
    def atol(self):
        return self.module().atol[...]

    @property
    def norm(self):
        return self.module().norm

    def bind(self, vector_field: Callable) -> "DiffraxErrorController":
        """**Returns:** a copy that evaluates `vector_field` for a controller that `uses_vector_field`."""
        return DiffraxErrorController(self.graphdef, self.params, vector_field)

    def extra_evaluations(self, num_steps: int) -> int:
        """**Returns:** the vector-field evaluations spent for the controller in a solve of
        `num_steps` attempted steps."""
        return num_steps + 1 if self.module().uses_vector_field else 0

    def _field(self, t, y, args):
        if not self.module().uses_vector_field:
            return None
        if self.vector_field is None:
            raise ValueError("This controller evaluates the vector field: attach it with bind(vector_field) before solving.")
        return self.vector_field(t, y, args)

    def init(self, terms, t0, t1, y0, dt0, args, func, error_order):  # diffrax's signature
        del terms, t1, func, error_order
        if dt0 is None:
            raise ValueError("An ErrorStepController starts from the solve's dt0; pass dt0 to diffeqsolve (e.g. from a starting-step rule).")
        return t0 + dt0, (self.module().init(y0), self._field(t0, y0, args))

    def adapt_step_size(self, t0, t1, y0, y1_candidate, args, y_error, error_order, controller_state):  # diffrax's signature
        if y_error is None:
            raise RuntimeError("An ErrorStepController needs a solver that provides an error estimate.")
        controller = self.module()
        state, f0 = controller_state
        f1 = self._field(t1, y1_candidate, args)
        attempt = StepAttempt(t0, t1, y0, y1_candidate, args, y_error, error_order, f0, f1)
        keep_step, state = controller.judge_step(attempt, state)
        pick = lambda a, b: jax.tree.map(lambda x, y: jnp.where(keep_step, x, y), a, b)
        next_t0, y, f = jnp.where(keep_step, t1, t0), pick(y1_candidate, y0), None if f0 is None else pick(f1, f0)
        dt, state = controller.adapt_step_size(next_t0, y, f, state)
        return keep_step, next_t0, next_t0 + dt, False, (state, f), diffrax.RESULTS.successful
