"""Classical stiffness indicators of one explicit Euler step ``y1 = y0 + h * f(y0)``.

Every function works on a batch: axis 0 indexes independent samples (a network in evaluation
mode treats samples independently), every other axis is part of the state, and each returns one
number per sample. Norms are Euclidean over all non-batch axes, computed in float32.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

_TINY = 1e-30


def sample_norm(x: jax.Array) -> jax.Array:
    """Euclidean norm of each sample, shape ``(B,)``."""
    x = x.astype(jnp.float32)
    return jnp.sqrt(jnp.sum(x * x, axis=tuple(range(1, x.ndim))))


def sample_mean(x: jax.Array) -> jax.Array:
    """Mean of each sample over all non-batch axes, shape ``(B,)``."""
    return x.astype(jnp.float32).mean(axis=tuple(range(1, x.ndim)))


def _ratio(a, b):
    return a / jnp.maximum(b, _TINY)


def _per_sample(scale, x):
    """Broadcast a per-sample ``(B,)`` array against ``x``."""
    return scale.reshape((-1,) + (1,) * (x.ndim - 1)).astype(x.dtype)


def relative_increment(y0: jax.Array, y1: jax.Array) -> jax.Array:
    """NSI candidate (a): ``||y1 - y0|| / ||y0||``, the relative change over one block.

    **Arguments:**

    - `y0`, `y1`: the states entering and leaving the block (same shape).

    **Returns:**

    One value per sample.
    """
    return _ratio(sample_norm(y1.astype(jnp.float32) - y0.astype(jnp.float32)), sample_norm(y0))


def secant_lipschitz(f: Callable, y0: jax.Array, f0: jax.Array, eps: float = 1e-2) -> jax.Array:
    """NSI candidate (b): the secant estimate ``||f(y0 + d f0) - f0|| / (d ||f0||)``.

    It is the local Lipschitz constant of `f` along its own direction; for a linear field
    ``f(y) = A y`` it equals ``||A f0|| / ||f0||`` for every `d`. The offset is chosen relative to
    the state, ``d ||f0|| = eps ||y0||``.

    **Arguments:**

    - `f`: the vector field.
    - `y0`: the state; `f0`: ``f(y0)``.
    - `eps`: size of the offset relative to ``||y0||``.

    **Returns:**

    One value per sample.
    """
    offset = eps * sample_norm(y0)
    d = _ratio(offset, sample_norm(f0))
    change = f(y0 + _per_sample(d, f0) * f0).astype(jnp.float32) - f0.astype(jnp.float32)
    return _ratio(sample_norm(change), offset)


def linearised_field(f: Callable, y0: jax.Array) -> Callable:
    """A linear map with the eigenvalues of the Jacobian ``J`` of `f` at `y0`, for `spectral_radius`.

    It is ``v -> J v`` by forward mode (`jax.linearize`). Forward mode cannot enter a layer with a
    custom reverse-mode rule (`jax.custom_vjp`, e.g. a hand-written convolution gradient); for
    such an `f` it is ``v -> J^T v`` by reverse mode, which has the same eigenvalues. Either way
    one application costs about one pass through `f`, also inside a loop.

    **Arguments:**

    - `f`: the vector field; `y0`: the point of linearisation.

    **Returns:**

    The linear map, acting on arrays shaped like `y0`.
    """
    if _forward_mode_works(f, y0):
        return jax.linearize(f, y0)[1]
    _, vjp = jax.vjp(f, y0)
    return lambda v: vjp(v.astype(y0.dtype))[0]


def _forward_mode_works(f, y0) -> bool:
    """Whether `f` is free of `jax.custom_vjp` calls, which forward mode cannot evaluate (checked on
    its jaxpr: nothing is computed)."""
    return not _calls_custom_vjp(jax.make_jaxpr(f)(jax.ShapeDtypeStruct(y0.shape, y0.dtype)).jaxpr)


def _calls_custom_vjp(jaxpr) -> bool:
    for eqn in jaxpr.eqns:
        if eqn.primitive.name.startswith("custom_vjp"):
            return True
        for value in eqn.params.values():
            for item in value if isinstance(value, (tuple, list)) else (value,):
                sub = getattr(item, "jaxpr", item)  # a ClosedJaxpr holds a Jaxpr
                if hasattr(sub, "eqns") and _calls_custom_vjp(sub):
                    return True
    return False


def spectral_radius(linear_map: Callable, v0: jax.Array, num_iters: int = 20) -> jax.Array:
    """NSI candidate (c): spectral radius of a linear map by power iteration, per sample.

    The growth ``||J v|| / ||v||`` is recorded at every iteration; the estimate is its geometric
    mean over the second half of the iterations, which also converges when the dominant
    eigenvalues are a complex pair (the ratio then oscillates around the modulus). Power iteration
    approaches the radius from the dominant eigenvector's side; with a small spectral gap it is a
    lower estimate.

    **Arguments:**

    - `linear_map`: ``v -> J v`` acting on a batch (e.g. `linearised_field`); it must not mix
      samples.
    - `v0`: the starting vectors, one per sample (nonzero).
    - `num_iters`: number of iterations (at least 2).

    **Returns:**

    One value per sample.
    """
    if num_iters < 2:
        raise ValueError(f"power iteration needs at least 2 iterations, got {num_iters}.")

    def body(v, _):
        w = linear_map(v)
        growth = sample_norm(w)
        return w / _per_sample(jnp.maximum(growth, _TINY), w), jnp.log(growth)

    v = v0 / _per_sample(sample_norm(v0), v0)
    _, log_growth = jax.lax.scan(body, v, None, length=num_iters)
    return jnp.exp(log_growth[num_iters // 2 :].mean(axis=0))


def heun_error(f: Callable, y0: jax.Array, f0: jax.Array, h: jax.Array) -> jax.Array:
    """NSI candidate (d): relative Euler-vs-Heun local error estimate of the step.

    Heun's step minus Euler's is ``h/2 * (f(y0 + h f0) - f0)``; the estimate is its norm relative
    to ``||y0||``. For ``f(y) = A y`` and scalar ``h`` it is ``h^2/2 ||A^2 y0|| / ||y0||``.

    **Arguments:**

    - `f`: the vector field; `y0`: the state; `f0`: ``f(y0)``.
    - `h`: the step, broadcastable against `y0` (per sample, channel, location...).

    **Returns:**

    One value per sample.
    """
    h = jnp.asarray(h, f0.dtype)
    correction = 0.5 * h * (f(y0 + h * f0).astype(jnp.float32) - f0.astype(jnp.float32))
    return _ratio(sample_norm(correction), sample_norm(y0))


def implied_step(h: jax.Array, error: jax.Array, tol: float) -> jax.Array:
    """The step a classical controller would choose: ``h* = h (tol / e)^(1/2)`` (Euler is order 1,
    so its local error scales as ``h^2``).

    **Arguments:**

    - `h`: the step taken, one value per sample; `error`: its local error estimate.
    - `tol`: the tolerance on the relative local error.

    **Returns:**

    One value per sample.
    """
    return h * jnp.sqrt(_ratio(jnp.asarray(tol, jnp.float32), error))
