"""The spatial moments of one Euler step that a step-size controller reads, in one pass on the CPU.

`spatial_moments(y, z, scale, shift)` gives, per example and channel, the means over the pixels of
the field ``f = scale * z + shift``, its absolute value, the variances of ``f`` and ``z``, ``y`` and
``|y|`` (and two more for the gradient into the scale and the shift): `Moments`. On the path of the
CPU extension (`stepjax.kernels.path_for`) one C++ handler (``csrc/spatial_moments.cc``) reads ``y``
and ``z`` once for six sums, from which the nine follow per channel; elsewhere, and where the
extension is not built, `jnp` reductions compute the same six. It is a forward function only: a
controller that differentiates through it writes its own gradient (as StepNet does).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_batching import custom_vmap
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from stepjax.kernels import onednn

TARGET = "stepjax_spatial_moments"  # one of onednn.TARGETS
NUM_MOMENTS = 6  # the handler's sums: y, |y|, u = z - z_0, u^2, sign(f), sign(f) u


class Moments(NamedTuple):
    """Per-channel spatial means of one step, each ``(B, C)`` float32 (`spatial_moments`).

    - `f`, `abs_f`, `var_f`: the mean of the field ``f = scale * z + shift``, of ``|f|``, and
      ``f``'s variance over the pixels.
    - `y`, `abs_y`: the means of the state and of its absolute value.
    - `sign_f`, `sign_f_z`, `z`, `var_z`: the means of ``sign(f)`` (+1 at 0), ``sign(f) z``, ``z``
      and ``z``'s variance (a gradient into the scale and the shift needs them).
    """

    f: jax.Array
    abs_f: jax.Array
    var_f: jax.Array
    y: jax.Array
    abs_y: jax.Array
    sign_f: jax.Array
    sign_f_z: jax.Array
    z: jax.Array
    var_z: jax.Array


def spatial_moments(y, z, scale=1.0, shift=0.0) -> Moments:
    """Per-channel spatial means of one step's state `y` and field ``f = scale * z + shift``.

    **Arguments:**

    - `y`, `z`: ``(B, H, W, C)``.
    - `scale`, `shift`: anything that broadcasts to ``(B, C)``: per example and channel, per
      channel (a field folded into its step: `stepjax.ode.ChannelAffine`), or 1 and 0 by default.

    **Returns:**

    The `Moments`. Both paths sum ``u = z - z_0``, ``z`` less its value at the example's first
    pixel, so that the variances, ``mean(u^2) - mean(u)^2``, lose float32 digits only as the
    pivot's distance from the mean in units of the spread (squared), not as the mean's own. The
    means of ``f`` and ``|f|`` follow from ``f = scale * u + f(z_0)``. On the extension's path the
    sums are taken in float64 from float32 rows.
    """
    return _moments(y, z, scale, shift, extension=onednn.path_for(jnp.float32) == "onednn")


def reduced_moments(y, z, scale=1.0, shift=0.0) -> Moments:
    """`spatial_moments` from `jnp` reductions (the path without the extension)."""
    return _moments(y, z, scale, shift, extension=False)


def _moments(y, z, scale, shift, extension):
    y, z = y.astype(jnp.float32), z.astype(jnp.float32)
    lead = (z.shape[0], z.shape[-1])
    scale, shift = (jnp.broadcast_to(jnp.asarray(v, jnp.float32), lead) for v in (scale, shift))
    pivot = z[:, 0, 0, :]
    at_pivot = scale * pivot + shift  # f(z_0): f = scale * u + f(z_0)
    sums = _batched(y, z, scale, shift) if extension else _reduced(y, z - _per_pixel(pivot), scale, at_pivot)
    return _from_sums(sums, pivot, scale, at_pivot)


def _from_sums(sums, pivot, scale, at_pivot):
    mean_y, abs_y, u, square_u, sign_f, sign_f_u = sums
    var_z = jnp.maximum(square_u - jnp.square(u), 0.0)
    return Moments(f=scale * u + at_pivot, abs_f=jnp.maximum(scale * sign_f_u + at_pivot * sign_f, 0.0),
                   var_f=jnp.square(scale) * var_z, y=mean_y, abs_y=abs_y, sign_f=sign_f,
                   sign_f_z=sign_f_u + pivot * sign_f, z=u + pivot, var_z=var_z)


def _reduced(y, u, scale, at_pivot):
    """The handler's six means as `jnp` reductions (the path without the extension), from
    ``u = z - z_0`` and ``f(z_0)``."""
    sign = jnp.where(_per_pixel(scale) * u + _per_pixel(at_pivot) >= 0, 1.0, -1.0)
    return tuple(v.mean(axis=(1, 2)) for v in (y, jnp.abs(y), u, jnp.square(u), sign, sign * u))


def _per_pixel(v):
    return v[:, None, None, :]


def _ffi(y, f, scale, shift, devices=None):
    out = jax.ShapeDtypeStruct((y.shape[0], y.shape[3]), jnp.float32)
    call = jax.ffi.ffi_call(TARGET, (out,) * NUM_MOMENTS, vmap_method="sequential")
    return tuple(call(y, f, scale, shift, threads=np.int64(onednn.threads(devices))))


@custom_partitioning
def _partitioned(y, f, scale, shift):  # lowered as it is only on one device
    return _ffi(y, f, scale, shift, devices=1)


def _partition(mesh, arg_shapes, result_shape):
    """Each device takes the moments of its own examples: the batch stays split, nothing is summed."""
    spec = arg_shapes[0].sharding.spec
    split = NamedSharding(mesh, P(spec[0] if len(spec) else None))
    return mesh, lambda *args: _ffi(*args, devices=mesh.size), (split,) * NUM_MOMENTS, (split,) * 4


_partitioned.def_partition(_partition, sharding_rule="b h w c, b h w c, b c, b c -> " + ", ".join(["b c"] * NUM_MOMENTS),
                           need_replication_factors=("h", "w", "c"))


@custom_vmap
def _batched(y, f, scale, shift):
    return _partitioned(y, f, scale, shift)


@_batched.def_vmap
def _merged(axis_size, in_batched, *operands):
    """Under `vmap` the mapped axis joins the batch: the moments are per example."""
    operands = [v if batched else jnp.broadcast_to(v, (axis_size, *v.shape)) for v, batched in zip(operands, in_batched)]
    lead = (axis_size, operands[0].shape[1])
    moments = _batched(*(v.reshape(-1, *v.shape[2:]) for v in operands))
    return tuple(m.reshape(*lead, m.shape[-1]) for m in moments), (True,) * NUM_MOMENTS
