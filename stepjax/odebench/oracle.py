"""The imitation target: from a visited state, the largest step whose error estimate lands on a
target, found by bisection on single solver steps."""

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optimistix as optx

from stepjax.ode import scaled_norm

from ._x64 import x64
from .problems import Problem
from .solve import make_solver

_CHUNK = 256  # states per compiled bisection (one compilation serves every chunk)


@eqx.filter_jit
def _bisect_chunk(vector_field, solver_name, args, tolerances, points, target, iters):
    """Bisect `iters` times in log step size per point; `points` = (t, y, log_lo, log_hi)."""
    term = diffrax.ODETerm(vector_field)
    rtol, atol = tolerances
    solver = make_solver(solver_name, diffrax.VeryChord(rtol=rtol, atol=atol, norm=optx.rms_norm))

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

    return jax.vmap(bisect)(*points)


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
    pad = -n % _CHUNK
    t, y, guess = (np.concatenate([a, np.repeat(a[-1:], pad, axis=0)]) for a in (t, y, log_guess))
    args = tuple(jnp.asarray(a) for a in problem.args)
    tolerances = jnp.asarray(rtol), jnp.asarray(rtol * problem.atol_factor)

    def chunk(start):
        part = slice(start, start + _CHUNK)
        points = jnp.asarray(t[part]), jnp.asarray(y[part]), jnp.asarray(guess[part] - span), jnp.asarray(guess[part] + span)
        return _bisect_chunk(problem.vector_field, problem.solver, args, tolerances, points, target, iters)

    return np.concatenate([chunk(start) for start in range(0, len(t), _CHUNK)])[:n]
