"""Reference solutions (Kvaerno5 at tight tolerance, cached on disk) and published anchors.

The reference solve is forced to step onto every point of `problem.save_ts`, so the
reference values there are step end points, not interpolants. Its Newton tolerances are
`rtol = atol = 100 tol` on the stage values: diffrax's default reuses the step
tolerances, and at `tol = 1e-12` (with the tiny absolute tolerances of Robertson, or the
large values of the Oregonator) the chord iteration then often fails to converge and the
solve stalls in rejected steps.
"""

import dataclasses
import hashlib
import json
import os
import pathlib

import diffrax
import jax.numpy as jnp
import numpy as np

from ._x64 import x64
from .problems import Problem, get_family
from .solve import make_solver

REFERENCE_TOL = 1e-12
_CACHE_VERSION = 2  # 2: Newton matrices factorised by PivotedLU


def cache_dir() -> pathlib.Path:
    """**Returns:** `$STEPJAX_ODE_CACHE`, else `~/.cache/stepjax/odebench`."""
    default = pathlib.Path.home() / ".cache" / "stepjax" / "odebench"
    return pathlib.Path(os.environ.get("STEPJAX_ODE_CACHE", default))


def _cache_key(problem: Problem, tol: float) -> str:
    spec = {
        "version": _CACHE_VERSION,
        "family": problem.family,
        "vector_field": problem.vector_field.__qualname__,
        "y0": problem.y0.tolist(),
        "t": [problem.t0, problem.t1],
        "args": list(problem.args),
        "save_ts": problem.save_ts.tolist(),
        "tol": tol,
        "atol_factor": problem.atol_factor,
    }
    digest = hashlib.sha256(json.dumps(spec).encode()).hexdigest()[:16]
    return f"{problem.family}_{digest}.npy"


@x64
def _reference_solve(problem: Problem, tol: float) -> np.ndarray:
    controller = diffrax.PIDController(
        rtol=tol,
        atol=tol * problem.atol_factor,
        pcoeff=0.4,
        icoeff=0.3,
        step_ts=jnp.asarray(problem.save_ts),
    )
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(problem.vector_field),
        make_solver("kvaerno5", diffrax.VeryChord(rtol=100 * tol, atol=100 * tol)),
        problem.t0,
        problem.t1,
        None,
        jnp.asarray(problem.y0),
        tuple(jnp.asarray(a) for a in problem.args),
        saveat=diffrax.SaveAt(ts=jnp.asarray(problem.save_ts)),
        stepsize_controller=controller,
        max_steps=4_000_000,
    )
    return np.asarray(sol.ys)


def reference_solution(problem: Problem, *, tol: float = REFERENCE_TOL, cache: bool = True) -> np.ndarray:
    """Reference solution of `problem` on `problem.save_ts`.

    **Arguments:**

    - `problem`: a [`Problem`][].
    - `tol`: `rtol` of the Kvaerno5 reference solve (`atol = tol * problem.atol_factor`).
    - `cache`: read from and write to [`cache_dir`][].

    **Returns:** array of shape `(len(problem.save_ts), problem.dim)`.
    """
    path = cache_dir() / _cache_key(problem, tol)
    if cache and path.exists():
        return np.load(path)
    ys = _reference_solve(problem, tol)
    if not np.all(np.isfinite(ys)):
        raise RuntimeError(f"Reference solve of {problem.name} did not finish with finite values.")
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, ys)
    return ys


@dataclasses.dataclass(frozen=True)
class Anchor:
    """A published end-point value for a family member over a given span.

    **Arguments:**

    - `family`, `param`, `t1`: which problem and until when.
    - `value`: the published solution at `t1`, in this package's variables.
    - `source`: where the value comes from.
    - `rtol`: agreement that `check_anchor` requires, relative to `|value| + floor`.
    - `floor`: absolute scale below which a component counts as zero.
    """

    family: str
    param: float
    t1: float
    value: tuple
    source: str
    rtol: float
    floor: float = 0.0

    def problem(self) -> Problem:
        base = get_family(self.family).problem(self.param)
        return base.replace(t1=self.t1, save_ts=np.array([base.t0, self.t1]))


ANCHORS = {
    # Bari "Test Set for IVP Solvers" VDPOL (eps = 1e-6, t = 2) in mu-form: with
    # mu = eps^(-1/2) = 1000 and t -> t / mu, y1 is unchanged and y2 is divided by mu.
    "vdp": Anchor(
        "vdp",
        1000.0,
        2000.0,
        (1.706167732170483, -0.8928097010247975e-3),
        "Bari IVP test set, VDPOL",
        1e-8,
    ),
    "robertson": Anchor(
        "robertson",
        3e7,
        1e11,
        (0.2083340149701255e-07, 0.8333360770334713e-13, 0.9999999791665050),
        "Bari IVP test set, ROBER",
        1e-7,
    ),
    "hires": Anchor(
        "hires",
        280.0,
        321.8122,
        (
            0.7371312573325668e-3,
            0.1442485726316185e-3,
            0.5888729740967575e-4,
            0.1175651343283149e-2,
            0.2386356198831331e-2,
            0.6238968252742796e-2,
            0.2849998395185769e-2,
            0.2850001604814231e-2,
        ),
        "Bari IVP test set, HIRES",
        1e-7,
    ),
    # The Arenstorf orbit is periodic: it returns to its initial state after one period.
    "arenstorf": Anchor(
        "arenstorf",
        0.012277471,
        17.0652165601579625588917206249,
        (0.994, 0.0, 0.0, -2.00158510637908252240537862224),
        "Hairer, Norsett, Wanner, Solving ODEs I, periodic orbit",
        1e-6,
        1.0,
    ),
}


def check_anchor(name: str, *, tol: float = REFERENCE_TOL, cache: bool = True) -> dict:
    """Compare the reference solution at an anchor's end point with the published value.

    **Arguments:**

    - `name`: a key of `ANCHORS`.
    - `tol`, `cache`: as for [`reference_solution`][].

    **Returns:** a dict with `computed`, `published`, `max_rel_error` (per component
    relative to `|published| + anchor.floor`) and `ok`.
    """
    if name not in ANCHORS:
        raise ValueError(f"Unknown anchor {name!r}; known: {', '.join(ANCHORS)}")
    anchor = ANCHORS[name]
    problem = anchor.problem()
    computed = reference_solution(problem, tol=tol, cache=cache)[-1]
    published = np.asarray(anchor.value)
    rel = np.abs(computed - published) / (np.abs(published) + anchor.floor)
    return {
        "name": name,
        "computed": computed.tolist(),
        "published": published.tolist(),
        "max_rel_error": float(rel.max()),
        "ok": bool(rel.max() <= anchor.rtol),
    }
