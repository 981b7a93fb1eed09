"""Run a stepjax `StepController` as the step-size controller of `diffrax.diffeqsolve`."""

from __future__ import annotations

from typing import Any

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
from flax import nnx

from stepjax.ode.controller import StepController


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

    Only forward integration is supported.

    **Arguments:**

    - `graphdef`, `params`: the controller split by `nnx.split`; build with `from_module`.
    """

    graphdef: Any = eqx.field(static=True)
    params: Any

    @classmethod
    def from_module(cls, controller: StepController) -> "DiffraxStepController":
        graphdef, params = nnx.split(controller)
        return cls(graphdef, params)

    def _decide(self, index, y, f, state):
        controller = nnx.merge(self.graphdef, self.params)
        h, state = controller.adapt_step_size(index, y[None], f[None], state)
        if jnp.size(h) != 1:
            raise ValueError(
                f"DiffraxStepController needs one step size per solve, got shape {jnp.shape(h)}; "
                "vmap the solve over samples for a per-sample controller."
            )
        return jnp.reshape(h, ()), state

    def wrap(self, direction):
        return self

    def init(self, terms, t0, t1, y0, dt0, args, func, error_order):
        del t1, dt0, error_order
        controller = nnx.merge(self.graphdef, self.params)
        state = controller.init(y0[None])
        h, state = self._decide(jnp.asarray(0), y0, func(terms, t0, y0, args), state)
        return t0 + h, (state, jnp.asarray(1))

    def adapt_step_size(self, t0, t1, y0, y1_candidate, args, y_error, error_order, controller_state):
        del args, y_error, error_order
        state, index = controller_state
        slope = jax.tree.map(lambda a, b: (b - a) / (t1 - t0), y0, y1_candidate)
        h, state = self._decide(index, y1_candidate, slope, state)
        return True, t1, t1 + h, False, (state, index + 1), diffrax.RESULTS.successful
