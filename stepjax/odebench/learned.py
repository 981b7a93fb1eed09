"""The learned step-size controller: PI34 times a bounded residual network on the log factor.

`ResidualPIDController` is a `stepjax.ode.ErrorStepController`, the protocol of the networks'
step-size controllers with the a-posteriori half an ODE solver needs, and runs in diffrax through
`stepjax.ode.DiffraxStepController`. Its classical part mirrors diffrax 0.7.2's
`PIDController.adapt_step_size` operation by operation (without `dtmin`/`dtmax`), so with the
network's last layer at zero the controller takes exactly PI34's accepted and rejected steps.
`judge_step` accepts classically (`error < 1`: the error guarantee never comes from the network)
and computes the features; `adapt_step_size` multiplies the clipped classical factor by `exp(r)`,
`r = max_log_residual * tanh(net(features))`. Unlike diffrax, the combined factor may shrink the
step after an accepted step (down to `factormin`); after a rejection it stays at most `safety`.
"""

import dataclasses
import json
import math
import pathlib
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from flax import nnx

from stepjax.ode import ErrorStepController, StepAttempt

from ._x64 import callback_f64
from .pid import PIDGains, pid_gains

FEATURES = (
    "log_error",
    "log_error_prev",
    "log_error_prev2",
    "log_step_ratio",
    "accepted",
    "prev_rejected",
    "log_classical_factor",
    "log_increment_ratio",
    "log_rtol",
)
STIFFNESS_FEATURES = ("log_h_secant_lipschitz",)
FACTOR_LIMITS = (0.2, 10.0)  # diffrax's PIDController defaults (factormin, factormax)


def _log(x):
    return jnp.log(jnp.clip(x, 1e-30, 1e30))


def _sign(flag):
    return jnp.where(flag, 1.0, -1.0)


def _array(x):
    return nnx.Variable(np.asarray(x, dtype=np.float64))


class Linear(nnx.Module):
    """``weight @ x + bias`` in float64, initialised uniformly in ``+-1/sqrt(in_size)``.

    **Arguments:** `in_size`, `out_size`: widths; `key`: PRNG key.
    """

    def __init__(self, in_size: int, out_size: int, key):
        weight_key, bias_key = jax.random.split(key)
        lim = 1 / math.sqrt(in_size)
        uniform = lambda k, shape: jax.random.uniform(k, shape, jnp.float64, minval=-lim, maxval=lim)
        self.weight = nnx.Param(uniform(weight_key, (out_size, in_size)))
        self.bias = nnx.Param(uniform(bias_key, (out_size,)))

    def __call__(self, x):
        return self.weight[...] @ x + self.bias[...]


class MLP(nnx.Module):
    """A tanh multilayer perceptron from one feature vector to one output.

    **Arguments:** `in_size`, `width`, `depth` (hidden layers), `key`.
    """

    def __init__(self, in_size: int, width: int, depth: int, key):
        sizes = (in_size, *[width] * depth, 1)
        keys = jax.random.split(key, depth + 1)
        self.layers = nnx.List([Linear(a, b, k) for a, b, k in zip(sizes[:-1], sizes[1:], keys)])

    def __call__(self, x):
        for layer in self.layers[:-1]:
            x = jnp.tanh(layer(x))
        return self.layers[-1](x)


def init_network(key, *, stiffness: bool = False, width: int = 32, depth: int = 2) -> MLP:
    """The controller's network from the features to one output, last layer zero.

    **Arguments:**

    - `key`: PRNG key.
    - `stiffness`: include the secant feature.
    - `width`, `depth`: hidden size and number of hidden layers.

    **Returns:** the `MLP` (float64); it outputs exactly 0 for every input.
    """
    n_in = len(FEATURES) + (len(STIFFNESS_FEATURES) if stiffness else 0)
    with jax.enable_x64(True):
        net = MLP(n_in, width, depth, key)
        last = net.layers[-1]
        last.weight[...] = jnp.zeros_like(last.weight[...])
        last.bias[...] = jnp.zeros_like(last.bias[...])
    return net


class ResidualState(NamedTuple):
    """Controller state between steps."""

    inv_error: jax.Array  # 1 / error of the last accepted step (diffrax's PID state)
    prev_inv_error: jax.Array  # ... and of the one before
    prev_dt: jax.Array  # size of the last attempt (0 before the first)
    rejected: jax.Array  # whether the last attempt was rejected
    increment: jax.Array  # scaled norm of the last accepted increment
    features: jax.Array  # the last attempt's features, for the next step's network call
    classical: jax.Array  # ... and its clipped classical factor


class ResidualPIDController(ErrorStepController):
    """A PID controller (PI34) times `exp(network residual)`; see the module docstring.

    Build it with `LearnedPolicy.controller` rather than directly.

    **Arguments:**

    - `rtol`, `atol`: tolerances.
    - `policy`: the `LearnedPolicy` (network and settings).
    - `gains`: the classical part (default PI34); factor limits are diffrax's defaults.
    - `recorder`: optional host callback receiving each attempt's features (training).
    """

    def __init__(self, rtol, atol, policy: "LearnedPolicy", *, gains: PIDGains | None = None, recorder: Callable | None = None):
        super().__init__(rtol, atol)
        gains = gains or pid_gains("PI34")
        self.net = policy.net
        self.pcoeff, self.icoeff, self.dcoeff, self.safety = map(_array, (gains.pcoeff, gains.icoeff, gains.dcoeff, gains.safety))
        self.factormin, self.factormax = map(_array, FACTOR_LIMITS)
        self.max_log_residual = policy.max_log_residual
        self.shrink_after_accept = policy.shrink_after_accept
        self.uses_vector_field = policy.stiffness
        self.recorder = recorder

    def init(self, y0):
        dtype = jnp.result_type(*jtu.tree_leaves(y0))
        one, zero = jnp.ones((), dtype), jnp.zeros((), dtype)
        n_features = len(FEATURES) + (len(STIFFNESS_FEATURES) if self.uses_vector_field else 0)
        return ResidualState(one, one, zero, jnp.array(False), zero, jnp.zeros(n_features, dtype), one)

    def _classical_factor(self, inv_error, keep_step, error_order, state):
        pcoeff, icoeff, dcoeff, safety = self.pcoeff[...], self.icoeff[...], self.dcoeff[...], self.safety[...]
        coeff1 = (icoeff + pcoeff + dcoeff) / error_order
        coeff2 = -(pcoeff + 2 * dcoeff) / error_order
        coeff3 = dcoeff / error_order
        factor1 = inv_error**coeff1
        factor2 = state.inv_error**coeff2
        factor3 = state.prev_inv_error**coeff3
        factormin = self.factormin[...] if self.shrink_after_accept else jnp.where(keep_step, 1, self.factormin[...])
        return jnp.clip(safety * factor1 * factor2 * factor3, min=factormin, max=self._factormax(keep_step))

    def _factormax(self, keep_step):
        return jnp.where(keep_step, self.factormax[...], self.safety[...])

    def _secant(self, attempt: StepAttempt):
        """``h ||f(y1) - f(y0)|| / ||y1 - y0||`` in the error scale (a local Lipschitz estimate)."""
        difference = lambda a, b: jtu.tree_map(lambda x, y: x - y, a, b)
        num = self.scaled_norm(attempt, difference(attempt.f1, attempt.f0))
        den = self.scaled_norm(attempt, difference(attempt.y1_candidate, attempt.y0))
        return jnp.where(den > 0, (attempt.t1 - attempt.t0) * num / jnp.where(den > 0, den, 1.0), 0.0)

    def _features(self, attempt, scaled_error, keep_step, classical, increment, state):
        prev_dt = attempt.t1 - attempt.t0
        columns = [
            _log(scaled_error) / 5,
            -_log(state.inv_error) / 5,
            -_log(state.prev_inv_error) / 5,
            jnp.where(state.prev_dt > 0, _log(prev_dt / state.prev_dt), 0.0),
            _sign(keep_step),
            _sign(state.rejected),
            _log(classical),
            jnp.where(state.increment > 0, _log(increment / state.increment), 0.0),
            jnp.log10(self.rtol[...]) / 10,
        ]
        if self.uses_vector_field:
            columns.append(_log(self._secant(attempt)) / 2)
        return jnp.clip(jnp.nan_to_num(jnp.stack(columns)), -10.0, 10.0)

    def judge_step(self, attempt, controller_state):
        state = controller_state
        scaled_error = self.scaled_norm(attempt, attempt.y_error)
        keep_step = scaled_error < 1
        inv_error = 1 / jnp.asarray(scaled_error)
        classical = self._classical_factor(inv_error, keep_step, attempt.error_order, state)
        increment = self.scaled_norm(attempt, jtu.tree_map(lambda a, b: a - b, attempt.y1_candidate, attempt.y0))
        features = self._features(attempt, scaled_error, keep_step, classical, increment, state)
        if self.recorder is not None:
            callback_f64(self.recorder, features, jnp.log(classical), attempt.t0, attempt.t1, attempt.y0, attempt.y1_candidate, keep_step)
        inv_error = jnp.where((inv_error == 0) | jnp.isinf(inv_error), 1, inv_error)
        return keep_step, ResidualState(
            inv_error=jnp.where(keep_step, inv_error, state.inv_error),
            prev_inv_error=jnp.where(keep_step, state.inv_error, state.prev_inv_error),
            prev_dt=attempt.t1 - attempt.t0,
            rejected=jnp.logical_not(keep_step),
            increment=jnp.where(keep_step, increment, state.increment),
            features=features,
            classical=classical,
        )

    def adapt_step_size(self, t0, y0, f0, controller_state):
        del t0, y0, f0
        state = controller_state
        residual = self.max_log_residual * jnp.tanh(self.net(state.features)[0])
        factor = jnp.clip(state.classical * jnp.exp(residual), min=self.factormin[...], max=self._factormax(jnp.logical_not(state.rejected)))
        return state.prev_dt * factor.astype(jnp.result_type(state.prev_dt)), state


@dataclasses.dataclass(frozen=True)
class LearnedPolicy:
    """A trained (or untrained) network plus the settings that turn it into a controller.

    **Arguments:**

    - `net`: from `init_network`.
    - `stiffness`: whether `net` takes the secant feature (one extra evaluation per attempt).
    - `max_log_residual`: bound on the network's log factor.
    - `shrink_after_accept`: let the classical factor itself drop below 1 after an accepted step
      (diffrax clips it at 1). With a zero network this is the classical ablation "PI34-shrink".
    """

    net: MLP
    stiffness: bool = False
    max_log_residual: float = math.log(3.0)
    shrink_after_accept: bool = False

    def controller(self, rtol, atol, *, recorder=None) -> ResidualPIDController:
        """**Returns:** the `ResidualPIDController` at these tolerances (PI34 base)."""
        return ResidualPIDController(rtol, atol, self, recorder=recorder)

    def save(self, path: pathlib.Path, **about):
        """Write the policy as JSON (settings, feature names, float64 weights exactly), plus `about`."""
        layers = [{"weight": layer.weight[...].tolist(), "bias": layer.bias[...].tolist()} for layer in self.net.layers]
        settings = {"stiffness": self.stiffness, "max_log_residual": self.max_log_residual, "shrink_after_accept": self.shrink_after_accept}
        features = list(FEATURES) + (list(STIFFNESS_FEATURES) if self.stiffness else [])
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({**about, **settings, "features": features, "layers": layers}, indent=1))

    @classmethod
    def load(cls, path: pathlib.Path) -> "LearnedPolicy":
        """**Returns:** the policy written by `save`."""
        saved = json.loads(path.read_text())
        layers = saved["layers"]
        net = init_network(jax.random.PRNGKey(0), stiffness=saved["stiffness"], width=len(layers[0]["bias"]), depth=len(layers) - 1)
        with jax.enable_x64(True):
            for layer, values in zip(net.layers, layers, strict=True):
                layer.weight[...] = jnp.asarray(values["weight"], dtype=jnp.float64)
                layer.bias[...] = jnp.asarray(values["bias"], dtype=jnp.float64)
        return cls(net, saved["stiffness"], saved["max_log_residual"], saved["shrink_after_accept"])
