"""The classical baselines: diffrax's `PIDController` with the published PID filters, and a PID tuned
by search on the training problems with the learned controller's budget."""

import dataclasses
from collections.abc import Sequence

import diffrax
import numpy as np

from .problems import Problem
from .workprecision import Curve, cost_ratio, error_levels, measure_curve

# diffrax's (pcoeff, icoeff, dcoeff) for the classical filters.
PID_BASELINES = {
    "I": (0.0, 1.0, 0.0),
    "PI34": (0.4, 0.3, 0.0),
    "PI42": (0.2, 0.4, 0.0),
    "PI33": (1 / 3, 1 / 3, 0.0),
    "H211PI": (-1 / 6, 1 / 3, 0.0),
    "H312PID": (-2 / 9, 2 / 9, 1 / 18),
    "Ranocha": (0.17, 0.33, 0.05),
}


@dataclasses.dataclass(frozen=True)
class PIDGains:
    """Coefficients of a diffrax `PIDController` (other settings stay at their defaults)."""

    pcoeff: float
    icoeff: float
    dcoeff: float
    safety: float = 0.9

    def controller(self, rtol, atol) -> diffrax.PIDController:
        """**Returns:** the `PIDController`, with array fields so one compilation serves all."""
        as_array = lambda x: np.asarray(x, dtype=np.float64)
        return diffrax.PIDController(
            rtol=as_array(rtol),
            atol=as_array(atol),
            pcoeff=as_array(self.pcoeff),
            icoeff=as_array(self.icoeff),
            dcoeff=as_array(self.dcoeff),
            safety=as_array(self.safety),
        )


def pid_gains(name: str) -> PIDGains:
    """**Arguments:** `name`: a key of `PID_BASELINES`.

    **Returns:** its `PIDGains`.
    """
    if name not in PID_BASELINES:
        raise ValueError(f"Unknown PID baseline {name!r}; known: {', '.join(PID_BASELINES)}")
    return PIDGains(*PID_BASELINES[name])


def training_score(curves: Sequence[Curve], baselines: Sequence[Curve]) -> float:
    """Mean log NFE ratio against the baseline at matched error over all problems.

    **Arguments:** `curves`, `baselines`: one curve per training problem, paired.

    **Returns:** the score (lower is better; 0 equals the baseline), `inf` on any failure
    or if some pair of curves has no common error range.
    """
    logs = []
    for curve, baseline in zip(curves, baselines, strict=True):
        levels = error_levels([curve, baseline])
        if curve.failures or levels.size == 0:
            return float("inf")
        logs.append(np.log(cost_ratio(curve, baseline, levels)))
    return float(np.nanmean(np.concatenate(logs)))


@dataclasses.dataclass
class TuneResult:
    """Outcome of `tune_pid`: best gains, their score, every candidate tried, solves used."""

    gains: PIDGains
    score: float
    history: list
    solves: int


SEARCH_MAX_STEPS = 50_000  # a candidate needing more on a training solve has lost anyway
_BOX = np.array([[-0.3, 0.8], [0.05, 1.0], [-0.1, 0.25], [0.7, 0.98]])  # p, i, d, safety


def tune_pid(
    problems: Sequence[Problem],
    rtols: Sequence[float],
    references: Sequence[np.ndarray],
    baselines: Sequence[Curve],
    budget: int,
    *,
    seed: int = 0,
    log=print,
) -> TuneResult:
    """Search (pcoeff, icoeff, dcoeff, safety) for the lowest `training_score`.

    Half the candidates are uniform in a box around the published filters, the rest are
    Gaussian perturbations of the best so far with a shrinking radius. PI34 is the first
    candidate, so the result is never worse than PI34 on the training set. A candidate
    solve that needs more than `SEARCH_MAX_STEPS` steps counts as a failure (score inf).

    **Arguments:**

    - `problems`, `references`: training problems and their reference solutions.
    - `rtols`: tolerances of each training curve.
    - `baselines`: PI34 curves on the same problems (the score's reference).
    - `budget`: number of solves allowed; each candidate costs `len(problems) * len(rtols)`.
    - `seed`: random seed.
    - `log`: progress printer.

    **Returns:** a `TuneResult`.
    """
    per_candidate = len(problems) * len(rtols)
    n = max(1, budget // per_candidate)
    rng = np.random.default_rng(seed)
    best = np.array([*PID_BASELINES["PI34"], 0.9])
    best_score, history = np.inf, []
    for k in range(n):
        if k == 0:
            x = best
        elif k < n // 2:
            x = rng.uniform(_BOX[:, 0], _BOX[:, 1])
        else:
            radius = 0.15 * (1 - (k - n // 2) / max(1, n - n // 2)) + 0.02
            x = np.clip(best + radius * (_BOX[:, 1] - _BOX[:, 0]) * rng.standard_normal(4), _BOX[:, 0], _BOX[:, 1])
        gains = PIDGains(*map(float, x))
        curves = [measure_curve(p, "candidate", gains.controller, rtols, ref, repeats=0, max_steps=SEARCH_MAX_STEPS) for p, ref in zip(problems, references)]
        score = training_score(curves, baselines)
        history.append({"gains": dataclasses.asdict(gains), "score": score})
        if score < best_score:
            best, best_score = x, score
        if score == best_score or (k + 1) % 10 == 0:
            log(f"    tuned PID candidate {k + 1}/{n}: score {score:+.4f}, best {best_score:+.4f} {PIDGains(*(round(float(v), 3) for v in best))}")
    return TuneResult(PIDGains(*map(float, best)), float(best_score), history, n * per_candidate)
