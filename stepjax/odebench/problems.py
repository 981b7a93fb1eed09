"""Test problems as parameterised families, each with training and held-out values.

Every vector field has diffrax's signature `f(t, y, args)` and takes its parameters
through `args`, so one compiled solve serves every member of a family whose state has
the same shape.
"""

import dataclasses
from collections.abc import Callable

import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Problem:
    """One initial value problem: a family evaluated at one parameter value.

    **Arguments:**

    - `family`: name of the family it belongs to.
    - `param`: the family parameter's value.
    - `vector_field`: `f(t, y, args)`.
    - `y0`, `t0`, `t1`, `args`: initial state, time span and vector-field arguments.
    - `save_ts`: the dense-output grid on which global error is measured.
    - `solver`: the solver name used on it (`"tsit5"` or `"kvaerno5"`).
    - `stiff`: whether it counts as stiff for the verdict.
    - `atol_factor`: `atol = rtol * atol_factor`; also the floor of the error measure.
    """

    family: str
    param_name: str
    param: float
    vector_field: Callable
    y0: np.ndarray
    t0: float
    t1: float
    args: tuple
    save_ts: np.ndarray
    solver: str
    stiff: bool
    atol_factor: float

    @property
    def name(self) -> str:
        return f"{self.family}[{self.param_name}={self.param:g}]"

    @property
    def dim(self) -> int:
        return int(self.y0.size)

    def replace(self, **changes) -> "Problem":
        """A copy with some fields changed (e.g. `t1`, `save_ts` for an anchor)."""
        return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True)
class Family:
    """A parameterised problem family.

    **Arguments:**

    - `name`, `param_name`: identifiers.
    - `vector_field`: shared by all members.
    - `setup`: `param -> (y0, t1, args, save_ts)`.
    - `train`, `held_out`: parameter values used to train and to evaluate.
    - `solver`, `stiff`, `atol_factor`: as in [`Problem`][].
    """

    name: str
    param_name: str
    vector_field: Callable
    setup: Callable
    train: tuple
    held_out: tuple
    solver: str
    stiff: bool
    atol_factor: float = 1.0

    def problem(self, param: float) -> Problem:
        """**Returns:** the member of this family at `param`."""
        y0, t1, args, save_ts = self.setup(param)
        return Problem(
            family=self.name,
            param_name=self.param_name,
            param=float(param),
            vector_field=self.vector_field,
            y0=np.asarray(y0, dtype=np.float64),
            t0=0.0,
            t1=float(t1),
            args=tuple(float(a) for a in args),
            save_ts=np.asarray(save_ts, dtype=np.float64),
            solver=self.solver,
            stiff=self.stiff,
            atol_factor=self.atol_factor,
        )

    def train_problems(self) -> list[Problem]:
        return [self.problem(p) for p in self.train]

    def held_out_problems(self) -> list[Problem]:
        return [self.problem(p) for p in self.held_out]


def _grid(t1, n=101):
    return np.linspace(0.0, t1, n)


# --- vector fields -----------------------------------------------------------------


def van_der_pol(t, y, args):
    (mu,) = args
    return jnp.stack([y[1], mu * (1 - y[0] ** 2) * y[1] - y[0]])


def robertson(t, y, args):
    k1, k2, k3 = args
    r1, r2, r3 = k1 * y[0], k2 * y[1] ** 2, k3 * y[1] * y[2]
    return jnp.stack([-r1 + r3, r1 - r2 - r3, r2])


def brusselator(t, y, args):
    (alpha,) = args
    n = y.shape[0] // 2
    u, v = y[:n], y[n:]
    diffusion = alpha * (n + 1) ** 2

    def laplacian(w, boundary):
        padded = jnp.pad(w, 1, constant_values=boundary)
        return padded[:-2] - 2 * w + padded[2:]

    du = 1 + u**2 * v - 4 * u + diffusion * laplacian(u, 1.0)
    dv = 3 * u - u**2 * v + diffusion * laplacian(v, 3.0)
    return jnp.concatenate([du, dv])


def lorenz(t, y, args):
    sigma, rho, beta = args
    x, yy, z = y
    return jnp.stack([sigma * (yy - x), x * (rho - z) - yy, x * yy - beta * z])


def hires(t, y, args):
    (k,) = args
    y1, y2, y3, y4, y5, y6, y7, y8 = y
    r = k * y6 * y8
    return jnp.stack(
        [
            -1.71 * y1 + 0.43 * y2 + 8.32 * y3 + 0.0007,
            1.71 * y1 - 8.75 * y2,
            -10.03 * y3 + 0.43 * y4 + 0.035 * y5,
            8.32 * y2 + 1.71 * y3 - 1.12 * y4,
            -1.745 * y5 + 0.43 * y6 + 0.43 * y7,
            -r + 0.69 * y4 + 1.71 * y5 - 0.43 * y6 + 0.69 * y7,
            r - 1.81 * y7,
            -r + 1.81 * y7,
        ]
    )


def oregonator(t, y, args):
    (s,) = args
    y1, y2, y3 = y
    return jnp.stack(
        [
            s * (y2 + y1 * (1 - 8.375e-6 * y1 - y2)),
            (y3 - (1 + y1) * y2) / s,
            0.161 * (y1 - y3),
        ]
    )


def lotka_volterra(t, y, args):
    a, b, c, d = args
    x, yy = y
    return jnp.stack([a * x + b * x * yy, c * yy + d * x * yy])


def arenstorf(t, y, args):
    (mu,) = args
    x, yy, vx, vy = y
    nu = 1 - mu
    d1 = ((x + mu) ** 2 + yy**2) ** 1.5
    d2 = ((x - nu) ** 2 + yy**2) ** 1.5
    ax = x + 2 * vy - nu * (x + mu) / d1 - mu * (x - nu) / d2
    ay = yy - 2 * vx - nu * yy / d1 - mu * yy / d2
    return jnp.stack([vx, vy, ax, ay])


def pleiades(t, y, args):
    (g,) = args
    x, yy, vx, vy = jnp.split(y, 4)
    mass = jnp.arange(1.0, 8.0)
    dx = x[None, :] - x[:, None]
    dy = yy[None, :] - yy[:, None]
    r3 = (dx**2 + dy**2) ** 1.5
    r3 = jnp.where(jnp.eye(7, dtype=bool), 1.0, r3)
    ax = g * jnp.sum(mass * dx / r3, axis=1)
    ay = g * jnp.sum(mass * dy / r3, axis=1)
    return jnp.concatenate([vx, vy, ax, ay])


# --- set-ups: param -> (y0, t1, args, save_ts) ---------------------------------------

ARENSTORF_PERIOD = 17.0652165601579625588917206249
ARENSTORF_Y0 = (0.994, 0.0, 0.0, -2.00158510637908252240537862224)


def _vdp_setup(mu):
    t1 = 10.0 + 2.0 * mu  # about one limit-cycle period or more
    return (2.0, 0.0), t1, (mu,), _grid(t1)


def _robertson_setup(k2):
    t1 = 1e5
    return (1.0, 0.0, 0.0), t1, (0.04, k2, 1e4), np.logspace(-5, 5, 41)


def _brusselator_setup(n):
    n = int(n)
    x = np.arange(1, n + 1) / (n + 1)
    y0 = np.concatenate([1 + np.sin(2 * np.pi * x), np.full(n, 3.0)])
    return y0, 10.0, (1 / 50,), _grid(10.0, 51)


def _lorenz_setup(rho):
    return (1.0, 1.0, 1.0), 5.0, (10.0, rho, 8 / 3), _grid(5.0)


def _hires_setup(k):
    t1 = 321.8122
    return (1.0, 0, 0, 0, 0, 0, 0, 0.0057), t1, (k,), _grid(t1, 51)


def _oregonator_setup(s):
    return (1.0, 2.0, 3.0), 360.0, (s,), _grid(360.0, 181)


def _lotka_volterra_setup(a):
    return (1.0, 1.0), 10.0, (a, -1.0, -3.0, 1.0), _grid(10.0)


def _arenstorf_setup(mu):
    t1 = ARENSTORF_PERIOD
    return ARENSTORF_Y0, t1, (mu,), _grid(t1)


def _pleiades_setup(g):
    x = (3, 3, -1, -3, 2, -2, 2)
    y = (3, -3, 2, 0, 0, -4, 4)
    vx = (0, 0, 0, 0, 0, 1.75, -1.5)
    vy = (0, 0, 0, -1.25, 1, 0, 0)
    return np.concatenate([x, y, vx, vy]), 3.0, (g,), _grid(3.0)


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in [
        Family("vdp", "mu", van_der_pol, _vdp_setup, (1, 2, 5, 10, 20), (3, 15, 50, 100), "tsit5", True),
        Family("robertson", "k2", robertson, _robertson_setup, (9e6, 3e7, 9e7), (3e6, 3e8), "kvaerno5", True, 1e-8),
        Family("brusselator", "N", brusselator, _brusselator_setup, (8, 16, 32), (24, 64), "kvaerno5", True),
        Family("lorenz", "rho", lorenz, _lorenz_setup, (20, 28, 35), (15, 45), "tsit5", False),
        Family("hires", "k", hires, _hires_setup, (), (280,), "kvaerno5", True, 1e-4),
        Family("oregonator", "s", oregonator, _oregonator_setup, (), (77.27,), "kvaerno5", True),
        Family("lotka_volterra", "a", lotka_volterra, _lotka_volterra_setup, (), (1.5,), "tsit5", False),
        Family("arenstorf", "mu", arenstorf, _arenstorf_setup, (), (0.012277471,), "tsit5", False),
        Family("pleiades", "G", pleiades, _pleiades_setup, (), (1.0,), "tsit5", False),
    ]
}


def get_family(name: str) -> Family:
    """**Arguments:** `name`: a key of `FAMILIES`.

    **Returns:** the [`Family`][].

    **Raises:** `ValueError` listing the known names if `name` is unknown.
    """
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"Unknown problem family {name!r}; known: {', '.join(FAMILIES)}") from None

