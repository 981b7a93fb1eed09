"""Training of the learned controller: imitation of the bisection oracle with DAgger-style rounds.

At every visited state the oracle step is the largest one whose error estimate is at most
`target_error` (`stepjax.odebench.oracle`). The targets are centred per solve (the median over
its accepted steps is subtracted): rescaling all steps uniformly only moves a controller along
its work-precision curve, so at matched error only the pattern of steps relative to each other
can save evaluations. The fit is a cautious expectile, because a step that comes out too large is
rejected and costs a whole step.
"""

import dataclasses
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from ._x64 import x64
from .learned import LearnedPolicy, init_network
from .oracle import oracle_log_steps
from .pid import pid_gains, training_score
from .problems import Problem
from .solve import is_explicit, solve
from .workprecision import Curve, measure_curve, primary_metric


@dataclasses.dataclass(frozen=True)
class ImitationConfig:
    """Settings of `train_imitation`.

    **Arguments:**

    - `stiffness`: use the secant feature.
    - `rounds`: number of fits.
    - `fit_steps`, `batch`, `learning_rate`: Adam on the weighted squared log error.
    - `overshoot`: weight in (0, 1) of errors where the predicted step is too large
      (`1 - overshoot` for too small): above 0.5 fits a cautious expectile.
    - `max_records`: states kept per solve for the oracle.
    - `target_error`: error estimate the oracle's step lands on.
    - `center`: subtract each solve's median target over accepted steps (see the module
      docstring); without it the network mostly learns a larger safety factor.
    - `oracle_iters`: bisection steps per state.
    """

    stiffness: bool = False
    rounds: int = 3
    fit_steps: int = 2000
    batch: int = 512
    learning_rate: float = 1e-3
    overshoot: float = 0.8
    max_records: int = 1000
    target_error: float = 0.8
    center: bool = True
    oracle_iters: int = 10


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


@dataclasses.dataclass
class TrainResult:
    """Outcome of `train_imitation`.

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
    data: tuple  # per solve: (features of the kept attempts, centred log ratio of oracle to classical step, weights 1 / number kept)
    cost: float  # solve-equivalents spent


def _collect(policy, problem, rtols, reference, config, rng) -> _Collected:
    """Run `policy` on `problem` at each tolerance, recording states and oracle targets."""
    span = policy.max_log_residual
    curve, inputs, targets, weights, cost = Curve("learned", primary_metric(problem)), [], [], [], 0.0
    for rtol in rtols:
        controller = policy.controller(rtol, rtol * problem.atol_factor, recorder=RECORDER)
        stats = solve(problem, controller, count=not is_explicit(problem.solver))
        curve.add(problem, rtol, stats, reference)
        rows = RECORDER.take()
        log_proposal = rows["log_dt"] + rows["log_classical"]
        usable = np.flatnonzero(np.isfinite(log_proposal) & np.isfinite(rows["y_next"]).all(axis=1))
        keep = np.sort(rng.choice(usable, min(config.max_records, len(usable)), replace=False))
        log_proposal = log_proposal[keep]
        log_best = oracle_log_steps(problem, rows["t_next"][keep], rows["y_next"][keep], log_proposal, rtol, span=span, target=config.target_error, iters=config.oracle_iters)
        gap = log_best - log_proposal
        gap -= np.median(gap[rows["accepted"][keep]]) if config.center else 0.0
        inputs.append(rows["features"][keep])
        targets.append(np.clip(gap, -0.95 * span, 0.95 * span))
        weights.append(np.full(len(keep), 1.0 / len(keep)))
        cost += 1 + len(keep) * config.oracle_iters / stats.num_steps
    return _Collected(curve, (inputs, targets, weights), cost)


def _fit(policy, data, config, key):
    """Adam on the expectile loss over all data collected so far. **Returns:** `(policy, last loss)`."""
    x, r, w = (jnp.asarray(np.concatenate(a)) for a in data)
    graphdef, params = nnx.split(policy.net)
    optimiser = optax.adam(config.learning_rate)
    opt_state = optimiser.init(params)

    def loss(params, idx):
        net = nnx.merge(graphdef, params)
        pred = policy.max_log_residual * jnp.tanh(jax.vmap(net)(x[idx])[:, 0])
        miss = pred - r[idx]
        weight = w[idx] * jnp.where(miss > 0, config.overshoot, 1 - config.overshoot)
        return jnp.sum(weight * miss**2) / jnp.sum(w[idx])

    @jax.jit
    def update(params, opt_state, key):
        idx = jax.random.randint(key, (config.batch,), 0, x.shape[0])
        value, grads = jax.value_and_grad(loss)(params, idx)
        updates, opt_state = optimiser.update(grads, opt_state)
        return optax.apply_updates(params, updates), opt_state, value

    for key in jax.random.split(key, config.fit_steps):
        params, opt_state, value = update(params, opt_state, key)
    return dataclasses.replace(policy, net=nnx.merge(graphdef, params)), float(value)


@x64
def train_imitation(
    problems: Sequence[Problem],
    rtols: Sequence[float],
    references: Sequence[np.ndarray],
    config: ImitationConfig = ImitationConfig(),
    *,
    seed: int = 0,
    log=print,
) -> TrainResult:
    """Train a `LearnedPolicy` by imitating the bisection oracle, with on-policy rounds.

    Round 0 collects states with the untrained controller (PI34's steps); each later
    round collects with the latest policy, adds the data and refits. Every policy is
    scored on the training problems by its NFE ratio to diffrax's PI34 at matched error
    (its own evaluations included), and the best one (possibly the untrained one) is
    returned.

    **Arguments:**

    - `problems`, `references`: training problems and their reference solutions.
    - `rtols`: training tolerances.
    - `config`: an `ImitationConfig`.
    - `seed`: random seed (network initialisation, state sampling, minibatches).
    - `log`: progress printer.

    **Returns:** a `TrainResult`.
    """
    key = jax.random.PRNGKey(seed)
    key, init_key = jax.random.split(key)
    rng = np.random.default_rng(seed)
    policy = LearnedPolicy(init_network(init_key, stiffness=config.stiffness), config.stiffness)
    pi34 = pid_gains("PI34").controller
    baselines = [measure_curve(p, "PI34", pi34, rtols, ref, repeats=0) for p, ref in zip(problems, references)]
    data, history, candidates, solves = ([], [], []), [], [], float(len(problems) * len(rtols))
    for rnd in range(config.rounds + 1):
        collected = [_collect(policy, p, rtols, ref, config, rng) for p, ref in zip(problems, references)]
        score = training_score([c.curve for c in collected], baselines)
        solves += sum(c.cost for c in collected)
        candidates.append((score, rnd, policy))
        entry = {"round": rnd, "score": score, "records": int(sum(len(t) for c in collected for t in c.data[1]))}
        if rnd < config.rounds:
            for c in collected:
                for store, part in zip(data, c.data):
                    store.extend(part)
            key, fit_key = jax.random.split(key)
            policy, entry["loss"] = _fit(policy, data, config, fit_key)
        history.append(entry)
        fitted = f", then fit (loss {entry['loss']:.4f})" if "loss" in entry else ""
        log(f"    round {rnd}: training score {score:+.4f} (mean log NFE ratio to PI34), {entry['records']} states{fitted}")
    score, rnd, best = min(candidates, key=lambda c: c[0])
    log(f"    kept the policy of round {rnd} (score {score:+.4f}); {solves:.0f} solve-equivalents")
    return TrainResult(best, baselines, history, solves)
