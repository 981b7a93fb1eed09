"""One adaptive solve of a benchmark problem, with exact cost accounting.

All controllers get the same start: the first step size comes from the Hairer-Norsett-
Wanner starting-step algorithm (two vector-field evaluations), and the FSAL solver state
is seeded with `f(t0, y0)` from it. (Left to itself, diffrax 0.7.2 starts every solve
with `dt0=None` at 0.01, because its starting-step routine is handed the wrapped term,
and re-evaluates the first stage after each rejection before the first accepted step.)
With this start an explicit FSAL Runge-Kutta solve costs exactly

    NFE = (stages - 1) x attempted steps + 2 (+ the controller's own evaluations),

which `tests/test_odebench.py` checks against a counting wrapper. Implicit solves are
counted by that wrapper: vector-field evaluations plus Jacobians (each Jacobian costs
`dim` evaluations in the reported NFE, as a forward-difference Jacobian would).
"""

import dataclasses
import functools
import time

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from stepjax.ode import DiffraxStepController, StepController

from ._x64 import x64
from .linear import PivotedLU
from .problems import Problem

MAX_STEPS = 200_000  # ten times the longest successful benchmark solve
_EVALS_PER_STEP = {"tsit5": 6}  # Tsit5: 7 stages, first same as last


def make_solver(name: str, root_finder: diffrax.VeryChord | None = None) -> diffrax.AbstractSolver:
    """The solver `name`; an implicit one factorises its Newton matrix with `PivotedLU`, so
    that its rounding does not depend on the machine's BLAS (see `stepjax.odebench.linear`).

    **Arguments:**

    - `name`: `"tsit5"` or `"kvaerno5"`.
    - `root_finder`: an implicit solver's Newton iteration, if not diffrax's default (whose
      tolerances are the step-size controller's); its linear solver is replaced.

    **Returns:** the diffrax solver.
    """
    solvers = {"tsit5": diffrax.Tsit5, "kvaerno5": diffrax.Kvaerno5}
    if name not in solvers:
        raise ValueError(f"Unknown solver {name!r}; known: {', '.join(solvers)}")
    solver = solvers[name]()
    if isinstance(solver, diffrax.AbstractImplicitSolver):
        root_finder = eqx.tree_at(lambda r: r.linear_solver, root_finder or solver.root_finder, PivotedLU())
        solver = eqx.tree_at(lambda s: s.root_finder, solver, root_finder)
    return solver


def is_explicit(solver_name: str) -> bool:
    return solver_name in _EVALS_PER_STEP


class EvaluationCounter:
    """Host-side counts of vector-field evaluations and Jacobians, via debug callbacks.

    A wrapped field counts one evaluation per primal call and one Jacobian per JVP
    call site; under `jax.jacfwd` the batched JVPs of one Jacobian count once.
    """

    def __init__(self):
        self.evaluations = 0
        self.jacobians = 0

    def reset(self):
        self.evaluations = 0
        self.jacobians = 0

    def _add_evaluation(self):
        self.evaluations += 1

    def _add_jacobian(self):
        self.jacobians += 1

    @functools.cache
    def wrap(self, vector_field):
        """**Returns:** `vector_field` with counting side effects (cached, so jit caches hit)."""

        @jax.custom_jvp
        def counted(t, y, args):
            jax.debug.callback(self._add_evaluation)
            return vector_field(t, y, args)

        @counted.defjvp
        def counted_jvp(primals, tangents):
            jax.debug.callback(self._add_jacobian)
            return jax.jvp(vector_field, primals, tangents)

        return counted


COUNTER = EvaluationCounter()


@dataclasses.dataclass(frozen=True)
class SolveStats:
    """Outcome of one solve.

    - `ys`: solution on `problem.save_ts`, shape `(len(save_ts), dim)`.
    - `num_steps`, `num_accepted`, `num_rejected`: step counts.
    - `nfe`: cost in vector-field evaluations (Jacobians weighted by `dim`), or `None`
      for an implicit solve that was not counted.
    - `jacobians`: Jacobian evaluations (implicit, counted solves), else 0.
    - `success`: diffrax reported success and the output is finite.
    - `wall_time`: minimum over repeats in seconds, after compilation, or `None`.
    """

    ys: np.ndarray
    num_steps: int
    num_accepted: int
    num_rejected: int
    nfe: int | None
    jacobians: int
    success: bool
    wall_time: float | None


def initial_step(vector_field, t0, y0, f0, args, controller, error_order):
    """Hairer-Norsett-Wanner starting step (Solving ODEs I, II.4); one evaluation beyond `f0`.

    **Returns:** the first step size.
    """
    norm = controller.norm
    scale = controller.atol + controller.rtol * jnp.abs(y0)
    d0, d1 = norm(y0 / scale), norm(f0 / scale)
    tiny = (d0 < 1e-5) | (d1 < 1e-5)
    h0 = jnp.where(tiny, 1e-6, 0.01 * d0 / jnp.where(tiny, 1.0, d1))
    f1 = vector_field(t0 + h0, y0 + h0 * f0, args)
    d2 = norm((f1 - f0) / scale) / h0
    dmax = jnp.maximum(d1, d2)
    h1 = jnp.where(dmax <= 1e-15, jnp.maximum(1e-6, 1e-3 * h0), (0.01 / dmax) ** (1 / error_order))
    return jnp.minimum(100 * h0, h1)


def _seed_fsal(solver, term, t0, t1, y0, args, f0):
    """FSAL solvers keep `(first_step, f0)`; hand them `f0` so nothing is recomputed."""
    state = solver.init(term, t0, t1, y0, args)
    if isinstance(state, tuple) and len(state) == 2:
        return jnp.array(False), f0
    return state


@eqx.filter_jit
def _solve(vector_field, solver_name, max_steps, controller, inputs):
    y0, args, t0, t1, ts = inputs
    term = diffrax.ODETerm(vector_field)
    solver = make_solver(solver_name)
    f0 = vector_field(t0, y0, args)
    dt0 = initial_step(vector_field, t0, y0, f0, args, controller, solver.error_order(term))
    state = _seed_fsal(solver, term, t0, t0 + dt0, y0, args, f0)
    if hasattr(controller, "bind"):
        controller = controller.bind(vector_field)
    sol = diffrax.diffeqsolve(
        term,
        solver,
        t0,
        t1,
        dt0,
        y0,
        args,
        saveat=diffrax.SaveAt(ts=ts),
        stepsize_controller=controller,
        solver_state=state,
        max_steps=max_steps,
        throw=False,
    )
    ok = (sol.result == diffrax.RESULTS.successful) & jnp.all(jnp.isfinite(sol.ys))
    stats = sol.stats
    return sol.ys, stats["num_steps"], stats["num_accepted_steps"], stats["num_rejected_steps"], ok


def explicit_nfe(solver_name: str, num_steps: int, controller) -> int:
    """NFE of an explicit FSAL solve started as in this module.

    **Arguments:**

    - `solver_name`: an explicit solver (`"tsit5"`).
    - `num_steps`: attempted steps (accepted + rejected).
    - `controller`: may define `extra_evaluations(num_steps)` for its own evaluations.

    **Returns:** `(stages - 1) * num_steps + 2 + extra`.
    """
    extra = getattr(controller, "extra_evaluations", lambda n: 0)(num_steps)
    return _EVALS_PER_STEP[solver_name] * num_steps + 2 + extra


def _inputs(problem: Problem):
    return (
        jnp.asarray(problem.y0),
        tuple(jnp.asarray(a) for a in problem.args),
        jnp.asarray(problem.t0),
        jnp.asarray(problem.t1),
        jnp.asarray(problem.save_ts),
    )


def _timed(fn):
    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    return out, time.perf_counter() - start


@x64
def solve(problem: Problem, controller, *, count: bool = False, repeats: int = 0, max_steps: int = MAX_STEPS) -> SolveStats:
    """Solve `problem` with `controller` and account for its cost.

    **Arguments:**

    - `problem`: a [`Problem`][].
    - `controller`: an adaptive diffrax step-size controller whose numeric fields are
      arrays (so that one compilation serves all tolerances and coefficients), or a
      `stepjax.ode.ErrorStepController`, run through `stepjax.ode.DiffraxStepController`.
    - `count`: count evaluations with [`EvaluationCounter`][] (needed for the NFE of
      implicit solvers; slow).
    - `repeats`: if positive (and `count` is false), time that many runs after a
      warm-up and keep the minimum.
    - `max_steps`: attempted steps after which the solve counts as failed.

    **Returns:** [`SolveStats`][].
    """
    vector_field = COUNTER.wrap(problem.vector_field) if count else problem.vector_field
    if isinstance(controller, StepController):
        controller = DiffraxStepController.from_module(controller)
    run = functools.partial(_solve, vector_field, problem.solver, max_steps, controller, _inputs(problem))
    COUNTER.reset()
    (ys, num_steps, accepted, rejected, ok), _ = _timed(run)
    jax.effects_barrier()
    evaluations, jacobians = COUNTER.evaluations, COUNTER.jacobians
    wall = None
    if repeats > 0 and not count:
        wall = min(_timed(run)[1] for _ in range(repeats))
    num_steps = int(num_steps)
    if count:
        nfe = evaluations + problem.dim * jacobians
    elif is_explicit(problem.solver):
        nfe = explicit_nfe(problem.solver, num_steps, controller)
    else:
        nfe = None
    return SolveStats(
        ys=np.asarray(ys),
        num_steps=num_steps,
        num_accepted=int(accepted),
        num_rejected=int(rejected),
        nfe=nfe,
        jacobians=jacobians,
        success=bool(ok),
        wall_time=wall,
    )
