"""A learned step-size controller: PI34 plus a bounded residual network on the log factor.

The classical part mirrors diffrax 0.7.2's `PIDController.adapt_step_size` operation by
operation (without `dtmin`/`dtmax`), so with the network's last layer at zero the
controller takes exactly PI34's accepted and rejected steps. The network then multiplies
the clipped classical factor by `exp(r)`, `r = max_log_residual * tanh(net(features))`.
Acceptance stays classical (`error < 1`): the error guarantee never comes from the
network. Unlike diffrax, the combined factor may shrink the step after an accepted step
(down to `factormin`); after a rejection it stays at most `safety`.

Training is imitation with DAgger-style on-policy rounds. At every visited state the
oracle step is the largest one whose error estimate is at most `target_error`, found by
bisection on single solver steps. The targets are centred per solve (the median over its
accepted steps is subtracted): rescaling all steps uniformly only moves a controller
along its work-precision curve, so at matched error only the pattern of steps relative
to each other can save evaluations. The fit is a cautious expectile, because a step that
comes out too large is rejected and costs a whole step.
"""

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import optax
import optimistix as optx

from ._x64 import callback_f64, x64
from .controllers import classical_gains, training_score
from .problems import Problem
from .solve import is_explicit, make_solver, solve
from .workprecision import Curve, measure_curve, primary_metric

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


def scaled_norm(norm, rtol, atol, y0, y1_candidate, tree):
    """`norm(tree / (atol + rtol * max(|y0|, |y1|)))`, as diffrax's `PIDController` scales errors.

    **Returns:** the scalar norm; a NaN candidate is replaced by `y0` in the scale.
    """

    def scale(_y0, _y1, _x):
        _y1 = jnp.where(jnp.isnan(_y1).any(), _y0, _y1)
        _y = jnp.maximum(jnp.abs(_y0), jnp.abs(_y1))
        with jax.numpy_dtype_promotion("standard"):
            return _x / (atol + _y * rtol)

    return norm(jtu.tree_map(scale, y0, y1_candidate, tree))


def _log(x):
    return jnp.log(jnp.clip(x, 1e-30, 1e30))


def _sign(flag):
    return jnp.where(flag, 1.0, -1.0)


class LearnedState(NamedTuple):
    """Controller state at the start of an attempted step."""

    inv_error: jax.Array  # 1 / error of the last accepted step (diffrax's PID state)
    prev_inv_error: jax.Array  # ... and of the one before
    prev_dt: jax.Array  # size of the previous attempt
    rejected: jax.Array  # whether the previous attempt was rejected
    increment: jax.Array  # scaled norm of the last accepted increment
    f0: object  # vector field at the current start point (stiffness features only)


class LearnedController(diffrax.AbstractAdaptiveStepSizeController[LearnedState, float | None]):
    """PI34 times `exp(residual network)`; see the module docstring.

    Build it with [`LearnedPolicy.controller`][] rather than directly.

    **Arguments:**

    - `rtol`, `atol`: tolerances.
    - `net`: an `eqx.nn.MLP` from features to one output.
    - `pcoeff`, `icoeff`, `dcoeff`, `safety`, `factormin`, `factormax`: as diffrax's
      `PIDController` (arrays).
    - `max_log_residual`: bound on `|log|` of the network's factor.
    - `stiffness`: add the secant feature `h ||f(y1) - f(y0)|| / ||y1 - y0||`, one
      extra vector-field evaluation per attempted step (plus one at the start).
    - `shrink_after_accept`: let the classical factor itself drop below 1 after an
      accepted step (diffrax clips it at 1). With a zero network this is the classical
      ablation "PI34, shrink allowed".
    - `vector_field`: set by [`stepjax.odebench.solve.solve`][] through `bind`.
    - `recorder`: optional host callback receiving each step's features (training).
    - `norm`: as diffrax's `PIDController`.
    """

    rtol: jax.Array
    atol: jax.Array
    net: eqx.nn.MLP
    pcoeff: jax.Array
    icoeff: jax.Array
    dcoeff: jax.Array
    safety: jax.Array
    factormin: jax.Array
    factormax: jax.Array
    max_log_residual: float = eqx.field(static=True)
    stiffness: bool = eqx.field(static=True, default=False)
    shrink_after_accept: bool = eqx.field(static=True, default=False)
    vector_field: Callable | None = eqx.field(static=True, default=None)
    recorder: Callable | None = eqx.field(static=True, default=None)
    norm: Callable = eqx.field(static=True, default=optx.rms_norm)

    def bind(self, vector_field) -> "LearnedController":
        """**Returns:** a copy that evaluates `vector_field` for its stiffness feature."""
        return dataclasses.replace(self, vector_field=vector_field)

    def extra_evaluations(self, num_steps: int) -> int:
        """**Returns:** the controller's own vector-field evaluations in a solve."""
        return num_steps + 1 if self.stiffness else 0

    def classical(self) -> diffrax.PIDController:
        """**Returns:** the `PIDController` this controller equals when the network is zero."""
        return diffrax.PIDController(
            rtol=self.rtol,
            atol=self.atol,
            pcoeff=self.pcoeff,
            icoeff=self.icoeff,
            dcoeff=self.dcoeff,
            safety=self.safety,
            factormin=self.factormin,
            factormax=self.factormax,
            norm=self.norm,
        )

    def wrap(self, direction):
        return self

    def init(self, terms, t0, t1, y0, dt0, args, func, error_order):
        t1, (inv_error, prev_inv_error, _) = self.classical().init(terms, t0, t1, y0, dt0, args, func, error_order)
        f0 = self.vector_field(t0, y0, args) if self.stiffness else None
        zero = jnp.zeros_like(inv_error)
        return t1, LearnedState(inv_error, prev_inv_error, t1 - t0, jnp.array(False), zero, f0)

    def _scaled(self, y0, y1_candidate, tree):
        return scaled_norm(self.norm, self.rtol, self.atol, y0, y1_candidate, tree)

    def _classical_factor(self, inv_error, keep_step, error_order, state):
        coeff1 = (self.icoeff + self.pcoeff + self.dcoeff) / error_order
        coeff2 = -(self.pcoeff + 2 * self.dcoeff) / error_order
        coeff3 = self.dcoeff / error_order
        factor1 = inv_error**coeff1
        factor2 = state.inv_error**coeff2
        factor3 = state.prev_inv_error**coeff3
        factormin = self.factormin if self.shrink_after_accept else jnp.where(keep_step, 1, self.factormin)
        factormax = jnp.where(keep_step, self.factormax, self.safety)
        return jnp.clip(self.safety * factor1 * factor2 * factor3, min=factormin, max=factormax)

    def _features(self, scaled_error, keep_step, classical, prev_dt, increment, secant, state):
        columns = [
            _log(scaled_error) / 5,
            -_log(state.inv_error) / 5,
            -_log(state.prev_inv_error) / 5,
            _log(prev_dt / state.prev_dt),
            _sign(keep_step),
            _sign(state.rejected),
            _log(classical),
            jnp.where(state.increment > 0, _log(increment / state.increment), 0.0),
            jnp.log10(self.rtol) / 10,
        ]
        if self.stiffness:
            columns.append(_log(secant) / 2)
        return jnp.clip(jnp.nan_to_num(jnp.stack(columns)), -10.0, 10.0)

    def _secant(self, t1, y0, y1_candidate, args, prev_dt, state):
        if not self.stiffness:
            return None, jnp.zeros(())
        f1 = self.vector_field(t1, y1_candidate, args)
        df = jtu.tree_map(lambda a, b: a - b, f1, state.f0)
        dy = jtu.tree_map(lambda a, b: a - b, y1_candidate, y0)
        num, den = self._scaled(y0, y1_candidate, df), self._scaled(y0, y1_candidate, dy)
        return f1, jnp.where(den > 0, prev_dt * num / jnp.where(den > 0, den, 1.0), 0.0)

    def adapt_step_size(self, t0, t1, y0, y1_candidate, args, y_error, error_order, controller_state):
        if y_error is None:
            raise RuntimeError("LearnedController needs a solver that provides an error estimate.")
        state = controller_state
        prev_dt = t1 - t0
        scaled_error = self._scaled(y0, y1_candidate, y_error)
        keep_step = scaled_error < 1
        inv_error = 1 / jnp.asarray(scaled_error)
        classical = self._classical_factor(inv_error, keep_step, error_order, state)

        increment = self._scaled(y0, y1_candidate, jtu.tree_map(lambda a, b: a - b, y1_candidate, y0))
        f1, secant = self._secant(t1, y0, y1_candidate, args, prev_dt, state)
        features = self._features(scaled_error, keep_step, classical, prev_dt, increment, secant, state)
        residual = self.max_log_residual * jnp.tanh(self.net(features)[0])
        factormax = jnp.where(keep_step, self.factormax, self.safety)
        factor = jnp.clip(classical * jnp.exp(residual), min=self.factormin, max=factormax)
        dt = prev_dt * factor.astype(jnp.result_type(prev_dt))
        if self.recorder is not None:
            callback_f64(self.recorder, features, jnp.log(classical), t0, t1, y0, y1_candidate, keep_step)

        pred = (inv_error == 0) | jnp.isinf(inv_error)
        inv_error = jnp.where(pred, 1, inv_error)
        next_t0 = jnp.where(keep_step, t1, t0)
        next_t1 = next_t0 + dt
        f0 = None if f1 is None else jtu.tree_map(lambda a, b: jnp.where(keep_step, a, b), f1, state.f0)
        new_state = LearnedState(
            inv_error=jnp.where(keep_step, inv_error, state.inv_error),
            prev_inv_error=jnp.where(keep_step, state.inv_error, state.prev_inv_error),
            prev_dt=prev_dt,
            rejected=jnp.logical_not(keep_step),
            increment=jnp.where(keep_step, increment, state.increment),
            f0=f0,
        )
        return keep_step, next_t0, next_t1, False, new_state, diffrax.RESULTS.successful


def init_network(key, *, stiffness: bool = False, width: int = 32, depth: int = 2) -> eqx.nn.MLP:
    """A tanh MLP from the controller features to one output, last layer zero.

    **Arguments:**

    - `key`: PRNG key.
    - `stiffness`: include the secant feature.
    - `width`, `depth`: hidden size and number of hidden layers.

    **Returns:** the `eqx.nn.MLP` (float64); it outputs exactly 0 for every input.
    """
    n_in = len(FEATURES) + (len(STIFFNESS_FEATURES) if stiffness else 0)
    with jax.enable_x64(True):
        mlp = eqx.nn.MLP(n_in, 1, width, depth, activation=jax.nn.tanh, key=key, dtype=jnp.float64)
        last = mlp.layers[-1]
        return eqx.tree_at(lambda m: (m.layers[-1].weight, m.layers[-1].bias), mlp, (jnp.zeros_like(last.weight), jnp.zeros_like(last.bias)))


@dataclasses.dataclass(frozen=True)
class LearnedPolicy:
    """A trained (or untrained) network plus the settings that turn it into a controller.

    **Arguments:**

    - `net`: from [`init_network`][].
    - `stiffness`: whether `net` takes the secant feature.
    - `max_log_residual`: bound on the network's log factor.
    - `shrink_after_accept`: as for [`LearnedController`][].
    """

    net: eqx.nn.MLP
    stiffness: bool = False
    max_log_residual: float = math.log(3.0)
    shrink_after_accept: bool = False

    def controller(self, rtol, atol, *, recorder=None) -> LearnedController:
        """**Returns:** the [`LearnedController`][] (PI34 base, diffrax's default limits)."""
        as_array = lambda x: np.asarray(x, dtype=np.float64)
        return LearnedController(
            rtol=as_array(rtol),
            atol=as_array(atol),
            net=self.net,
            pcoeff=as_array(0.4),
            icoeff=as_array(0.3),
            dcoeff=as_array(0.0),
            safety=as_array(0.9),
            factormin=as_array(0.2),
            factormax=as_array(10.0),
            max_log_residual=self.max_log_residual,
            stiffness=self.stiffness,
            shrink_after_accept=self.shrink_after_accept,
            recorder=recorder,
        )


class StepRecorder:
    """Host-side log of every attempted step, filled by a recording controller."""

    def __init__(self):
        self.rows = []

    def __call__(self, features, log_classical, t0, t1, y0, y1, accepted):
        self.rows.append((features, float(log_classical), float(t0), float(t1), y0, y1, bool(accepted)))

    def take(self) -> dict:
        """Empty the log. **Returns:** the attempts as arrays, with each one's next start point."""
        features, log_classical, t0, t1, y0, y1, accepted = map(np.asarray, zip(*self.rows))
        self.rows = []
        return {
            "features": features,
            "log_classical": log_classical,
            "log_dt": np.log(t1 - t0),
            "accepted": accepted,
            "t_next": np.where(accepted, t1, t0),
            "y_next": np.where(accepted[:, None], y1, y0),
        }


RECORDER = StepRecorder()


# --- imitation training ------------------------------------------------------------

_ORACLE_CHUNK = 256


def _oracle_solver(name, rtol, atol):
    solver = make_solver(name)
    if isinstance(solver, diffrax.AbstractImplicitSolver):
        root_finder = diffrax.VeryChord(rtol=rtol, atol=atol, norm=optx.rms_norm)
        solver = eqx.tree_at(lambda s: s.root_finder, solver, root_finder)
    return solver


@eqx.filter_jit
def _bisect_chunk(vector_field, solver_name, args, rtol, atol, t, y, log_lo, log_hi, target, iters):
    term = diffrax.ODETerm(vector_field)
    solver = _oracle_solver(solver_name, rtol, atol)

    def error(t, y, log_h):
        t1 = t + jnp.exp(log_h)
        state = solver.init(term, t, t1, y, args)
        y1, y_error, _, _, result = solver.step(term, t, t1, y, args, state, made_jump=False)
        err = scaled_norm(optx.rms_norm, rtol, atol, y, y1, y_error)
        return jnp.where((result == diffrax.RESULTS.successful) & jnp.isfinite(err), err, jnp.inf)

    def bisect(t, y, lo, hi):
        def body(_, bounds):
            lo, hi = bounds
            mid = 0.5 * (lo + hi)
            ok = error(t, y, mid) <= target
            return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

        return jax.lax.fori_loop(0, iters, body, (lo, hi))[0]

    return jax.vmap(bisect)(t, y, log_lo, log_hi)


@x64
def oracle_log_steps(problem: Problem, t, y, log_guess, rtol, *, span: float, target: float = 0.8, iters: int = 10) -> np.ndarray:
    """Largest step from each state whose error estimate is at most `target`, by bisection.

    **Arguments:**

    - `problem`: supplies the vector field, arguments and solver.
    - `t`, `y`: start points, shapes `(n,)` and `(n, dim)`.
    - `log_guess`: log of a step size per point; the search covers `log_guess +- span`.
    - `rtol`: relative tolerance (`atol = rtol * problem.atol_factor`).
    - `target`: error estimate to land on or below.
    - `iters`: bisection iterations (single solver steps) per point.

    **Returns:** log of the step per point (the lower end if even that fails).
    """
    n = len(t)
    pad = -n % _ORACLE_CHUNK
    t, y, guess = (np.concatenate([a, np.repeat(a[-1:], pad, axis=0)]) for a in (t, y, log_guess))
    args = tuple(jnp.asarray(a) for a in problem.args)
    tolerances = jnp.asarray(rtol), jnp.asarray(rtol * problem.atol_factor)

    def chunk(start):
        part = slice(start, start + _ORACLE_CHUNK)
        bounds = jnp.asarray(guess[part] - span), jnp.asarray(guess[part] + span)
        return _bisect_chunk(problem.vector_field, problem.solver, args, *tolerances, jnp.asarray(t[part]), jnp.asarray(y[part]), *bounds, target, iters)

    return np.concatenate([chunk(start) for start in range(0, len(t), _ORACLE_CHUNK)])[:n]


@dataclasses.dataclass
class TrainResult:
    """Outcome of [`train_imitation`][].

    - `policy`: the best policy by training score (possibly the untrained one, = PI34).
    - `baselines`: diffrax PI34 curves on the training problems.
    - `history`: per round, the score of the policy that collected the data, and sizes.
    - `solves`: cost in solve-equivalents: every solve (baseline and collection) counts
      1, and the bisection steps count as solves of the same problem with as many steps.
    """

    policy: LearnedPolicy
    baselines: list
    history: list
    solves: float


class _Collected(NamedTuple):
    curve: Curve  # the collecting policy's work-precision curve
    inputs: list  # per solve: features of the kept attempts
    targets: list  # per solve: centred log ratio of oracle to classical step
    weights: list  # per solve: 1 / number kept, so that every solve weighs the same
    cost: float  # solve-equivalents spent


def _collect(policy, problem, rtols, reference, *, max_records, span, target, iters, center, rng) -> _Collected:
    """Run `policy` on `problem` at each tolerance, recording states and oracle targets."""
    curve, inputs, targets, weights, cost = Curve("learned", primary_metric(problem)), [], [], [], 0.0
    for rtol in rtols:
        controller = policy.controller(rtol, rtol * problem.atol_factor, recorder=RECORDER)
        stats = solve(problem, controller, count=not is_explicit(problem.solver))
        curve.add(problem, rtol, stats, reference)
        rows = RECORDER.take()
        log_proposal = rows["log_dt"] + rows["log_classical"]
        usable = np.flatnonzero(np.isfinite(log_proposal) & np.isfinite(rows["y_next"]).all(axis=1))
        keep = np.sort(rng.choice(usable, min(max_records, len(usable)), replace=False))
        log_proposal = log_proposal[keep]
        log_best = oracle_log_steps(problem, rows["t_next"][keep], rows["y_next"][keep], log_proposal, rtol, span=span, target=target, iters=iters)
        gap = log_best - log_proposal
        gap -= np.median(gap[rows["accepted"][keep]]) if center else 0.0
        inputs.append(rows["features"][keep])
        targets.append(np.clip(gap, -0.95 * span, 0.95 * span))
        weights.append(np.full(len(keep), 1.0 / len(keep)))
        cost += 1 + len(keep) * iters / stats.num_steps
    return _Collected(curve, inputs, targets, weights, cost)


def _fit(policy, inputs, targets, weights, *, steps, batch, learning_rate, overshoot, key):
    x, r, w = (jnp.asarray(np.concatenate(a)) for a in (inputs, targets, weights))
    params, static = eqx.partition(policy.net, eqx.is_inexact_array)
    optimiser = optax.adam(learning_rate)
    opt_state = optimiser.init(params)

    def loss(params, idx):
        net = eqx.combine(params, static)
        pred = policy.max_log_residual * jnp.tanh(jax.vmap(net)(x[idx])[:, 0])
        miss = pred - r[idx]
        weight = w[idx] * jnp.where(miss > 0, overshoot, 1 - overshoot)
        return jnp.sum(weight * miss**2) / jnp.sum(w[idx])

    @jax.jit
    def update(params, opt_state, key):
        idx = jax.random.randint(key, (batch,), 0, x.shape[0])
        value, grads = jax.value_and_grad(loss)(params, idx)
        updates, opt_state = optimiser.update(grads, opt_state)
        return optax.apply_updates(params, updates), opt_state, value

    for key in jax.random.split(key, steps):
        params, opt_state, value = update(params, opt_state, key)
    return dataclasses.replace(policy, net=eqx.combine(params, static)), float(value)


@x64
def train_imitation(
    problems: Sequence[Problem],
    rtols: Sequence[float],
    references: Sequence[np.ndarray],
    *,
    stiffness: bool = False,
    rounds: int = 3,
    fit_steps: int = 2000,
    batch: int = 512,
    learning_rate: float = 1e-3,
    overshoot: float = 0.8,
    max_records: int = 1500,
    target_error: float = 0.8,
    center: bool = True,
    oracle_iters: int = 10,
    seed: int = 0,
    log=print,
) -> TrainResult:
    """Train a [`LearnedPolicy`][] by imitating the bisection oracle, with on-policy rounds.

    Round 0 collects states with the untrained controller (PI34's steps); each later
    round collects with the latest policy, adds the data and refits. Every policy is
    scored on the training problems by its NFE ratio to diffrax's PI34 at matched error
    (its own evaluations included), and the best one (possibly the untrained one) is
    returned.

    **Arguments:**

    - `problems`, `references`: training problems and their reference solutions.
    - `rtols`: training tolerances.
    - `stiffness`: use the secant feature.
    - `rounds`: number of fits.
    - `fit_steps`, `batch`, `learning_rate`: Adam on the weighted squared log error.
    - `overshoot`: weight in (0, 1) of errors where the predicted step is too large
      (`1 - overshoot` for too small): above 0.5 fits a cautious expectile.
    - `max_records`: states kept per solve for the oracle.
    - `target_error`: error estimate the oracle's step lands on.
    - `center`: subtract each solve's median target over accepted steps (see the
      module docstring); without it the network mostly learns a larger safety factor.
    - `oracle_iters`: bisection steps per state.
    - `seed`: random seed.
    - `log`: progress printer.

    **Returns:** a [`TrainResult`][].
    """
    key = jax.random.PRNGKey(seed)
    key, init_key = jax.random.split(key)
    rng = np.random.default_rng(seed)
    policy = LearnedPolicy(init_network(init_key, stiffness=stiffness), stiffness)
    settings = dict(max_records=max_records, span=policy.max_log_residual, target=target_error, iters=oracle_iters, center=center, rng=rng)
    pi34 = classical_gains("PI34").controller
    baselines = [measure_curve(p, "PI34", pi34, rtols, ref, repeats=0) for p, ref in zip(problems, references)]
    data, history, candidates, solves = ([], [], []), [], [], float(len(problems) * len(rtols))
    for rnd in range(rounds + 1):
        collected = [_collect(policy, p, rtols, ref, **settings) for p, ref in zip(problems, references)]
        score = training_score([c.curve for c in collected], baselines)
        solves += sum(c.cost for c in collected)
        candidates.append((score, rnd, policy))
        entry = {"round": rnd, "score": score, "records": int(sum(len(t) for c in collected for t in c.targets))}
        if rnd < rounds:
            for c in collected:
                for store, part in zip(data, (c.inputs, c.targets, c.weights)):
                    store.extend(part)
            key, fit_key = jax.random.split(key)
            policy, entry["loss"] = _fit(policy, *data, steps=fit_steps, batch=batch, learning_rate=learning_rate, overshoot=overshoot, key=fit_key)
        history.append(entry)
        fitted = f", then fit (loss {entry['loss']:.4f})" if "loss" in entry else ""
        log(f"    round {rnd}: training score {score:+.4f} (mean log NFE ratio to PI34), {entry['records']} states{fitted}")
    score, rnd, best = min(candidates, key=lambda c: c[0])
    log(f"    kept the policy of round {rnd} (score {score:+.4f}); {solves:.0f} solve-equivalents")
    return TrainResult(best, baselines, history, solves)
