"""Work-precision curves and NFE ratios at matched achieved error."""

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

from .problems import Problem
from .solve import MAX_STEPS, SolveStats, is_explicit, solve


def global_error(problem: Problem, ys: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """Scaled global error of a solution against the reference.

    Each component's error is divided by `|y_ref| + problem.atol_factor` (relative
    error, absolute below the problem's absolute-tolerance scale).

    **Arguments:**

    - `problem`: the [`Problem`][] solved.
    - `ys`, `reference`: solutions on `problem.save_ts`, shape `(time, dim)`.

    **Returns:** `(rms, final)`: RMS over the dense-output grid and all components, and
    RMS over components at the final time.
    """
    scaled = (np.asarray(ys) - reference) / (np.abs(reference) + problem.atol_factor)
    return float(np.sqrt(np.mean(scaled**2))), float(np.sqrt(np.mean(scaled[-1] ** 2)))


MAX_ERROR = 1e-2


def primary_metric(problem: Problem) -> str:
    """The error used to match controllers on `problem`.

    Explicit solves: `"error"` (RMS over the dense output; Tsit5's interpolant is of
    order 4). Implicit solves: `"final_error"`, because Kvaerno5's dense output is a
    cubic Hermite interpolant whose error swamps the solver's at tight tolerances.
    """
    return "error" if is_explicit(problem.solver) else "final_error"


@dataclasses.dataclass
class Curve:
    """One controller's work-precision data on one problem, one entry per tolerance.

    `metric` names the error (`"error"` or `"final_error"`) used by default when curves
    are compared. Failed solves keep their row with `success = False`; they, and solves
    with an error above `MAX_ERROR` (fewer than two correct digits, where curves of
    orbits and oscillators fold back), are left out of interpolation (`points`).
    """

    controller: str
    metric: str = "error"
    rtol: list = dataclasses.field(default_factory=list)
    error: list = dataclasses.field(default_factory=list)
    final_error: list = dataclasses.field(default_factory=list)
    nfe: list = dataclasses.field(default_factory=list)
    wall_time: list = dataclasses.field(default_factory=list)
    accepted: list = dataclasses.field(default_factory=list)
    rejected: list = dataclasses.field(default_factory=list)
    success: list = dataclasses.field(default_factory=list)

    def add(self, problem: Problem, rtol: float, stats: SolveStats, reference: np.ndarray):
        """Append one solve at tolerance `rtol`, measuring its error against `reference`."""
        rms, final = global_error(problem, stats.ys, reference) if stats.success else (np.nan, np.nan)
        self.rtol.append(rtol)
        self.error.append(rms)
        self.final_error.append(final)
        self.nfe.append(stats.nfe)
        self.wall_time.append(stats.wall_time)
        self.accepted.append(stats.num_accepted)
        self.rejected.append(stats.num_rejected)
        self.success.append(stats.success)

    @property
    def failures(self) -> int:
        return sum(not s for s in self.success)

    def points(self, cost: str = "nfe", error: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """**Returns:** `(errors, costs)` of the successful solves, sorted by error
        (`error` defaults to `self.metric`)."""
        error = error or self.metric
        ok = [i for i, s in enumerate(self.success) if s and 0 < getattr(self, error)[i] <= MAX_ERROR]
        e = np.array([getattr(self, error)[i] for i in ok], dtype=float)
        c = np.array([getattr(self, cost)[i] for i in ok], dtype=float)
        order = np.argsort(e)
        return e[order], c[order]


def measured_solve(problem: Problem, controller, repeats: int, max_steps: int = MAX_STEPS) -> SolveStats:
    """A solve with its NFE and, if `repeats > 0`, its wall time.

    Explicit solves get both from one uncounted run; implicit ones need a counted run
    for the NFE and a separate uncounted run for the time.

    **Returns:** [`stepjax.odebench.solve.SolveStats`][].
    """
    if is_explicit(problem.solver):
        return solve(problem, controller, repeats=repeats, max_steps=max_steps)
    counted = solve(problem, controller, count=True, max_steps=max_steps)
    if repeats == 0:
        return counted
    timed = solve(problem, controller, repeats=repeats, max_steps=max_steps)
    return dataclasses.replace(timed, nfe=counted.nfe, jacobians=counted.jacobians)


def measure_curve(
    problem: Problem,
    name: str,
    make_controller: Callable[[float, float], object],
    rtols: Sequence[float],
    reference: np.ndarray,
    *,
    repeats: int = 1,
    max_steps: int = MAX_STEPS,
) -> Curve:
    """Solve `problem` at each tolerance and record cost and achieved error.

    **Arguments:**

    - `problem`: a [`Problem`][].
    - `name`: controller label.
    - `make_controller`: `(rtol, atol) -> controller`.
    - `rtols`: relative tolerances; `atol = rtol * problem.atol_factor`.
    - `reference`: from [`stepjax.odebench.reference_solution`][].
    - `repeats`: timed repeats per solve (minimum kept); 0 for no timing.
    - `max_steps`: attempted steps after which a solve counts as failed.

    **Returns:** a [`Curve`][].
    """
    curve = Curve(name, primary_metric(problem))
    for rtol in rtols:
        stats = measured_solve(problem, make_controller(rtol, rtol * problem.atol_factor), repeats, max_steps)
        curve.add(problem, rtol, stats, reference)
    return curve


def error_levels(curves: Sequence[Curve], n: int = 4, error: str | None = None) -> np.ndarray:
    """Error levels spread over the range that every curve covers.

    **Arguments:**

    - `curves`: the curves to compare.
    - `n`: number of levels, at the midpoints of `n` equal slices of the common
      log-error range.
    - `error`: `"error"` (dense RMS) or `"final_error"`; default: each curve's metric.

    **Returns:** the levels (empty if the curves' error ranges do not overlap).
    """
    ranges = [np.log(c.points(error=error)[0]) for c in curves]
    if any(r.size < 2 for r in ranges):
        return np.array([])
    lo, hi = max(r[0] for r in ranges), min(r[-1] for r in ranges)
    if lo >= hi:
        return np.array([])
    return np.exp(lo + (hi - lo) * (np.arange(n) + 0.5) / n)


def cost_at_error(curve: Curve, levels: np.ndarray, cost: str = "nfe", error: str | None = None) -> np.ndarray:
    """Cost interpolated at given errors, linearly in log-log coordinates.

    **Returns:** one cost per level; `nan` outside the curve's error range.
    """
    e, c = curve.points(cost=cost, error=error)
    if e.size < 2:
        return np.full(len(levels), np.nan)
    log_levels = np.log(levels)
    out = np.exp(np.interp(log_levels, np.log(e), np.log(c)))
    return np.where((log_levels >= np.log(e[0])) & (log_levels <= np.log(e[-1])), out, np.nan)


def cost_ratio(curve: Curve, baseline: Curve, levels: np.ndarray, cost: str = "nfe", error: str | None = None) -> np.ndarray:
    """**Returns:** `cost(curve) / cost(baseline)` at matched error, per level."""
    return cost_at_error(curve, levels, cost, error) / cost_at_error(baseline, levels, cost, error)
