"""The spatial moments of one Euler step that a step-size controller reads, in one pass on the CPU.

`spatial_moments(y, z, scale, shift)` gives, per example and channel, the means over the pixels of
the field ``f = scale * z + shift``, its absolute value and square, ``y`` and ``|y|`` (and four for the
gradient into the scale and the shift). On the path of the CPU extension (`stepjax.kernels.path_for`)
one C++ handler (``csrc/spatial_moments.cc``) reads ``y`` and ``z`` once; elsewhere, and where the
extension is not built, `jnp` reductions compute the same means. It is a forward function
only: a controller that differentiates through it writes its own gradient (as StepNet does).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_batching import custom_vmap
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from stepjax.kernels import onednn

TARGET = "stepjax_spatial_moments"  # one of onednn.TARGETS
NUM_MOMENTS = 9  # f, |f|, f^2, y, |y|, sign(f), sign(f) z, z, z^2


def spatial_moments(y, z, scale=1.0, shift=0.0):
    """Per-channel spatial means of one step's state `y` and field ``f = scale * z + shift``.

    **Arguments:**

    - `y`, `z`: ``(B, H, W, C)``.
    - `scale`, `shift`: anything that broadcasts to ``(B, C)``: per example and channel, per
      channel (a field folded into its step: `stepjax.ode.ChannelAffine`), or 1 and 0 by default.

    **Returns:**

    ``(mean f, mean |f|, mean f^2, mean y, mean |y|, mean sign(f), mean sign(f) z, mean z,
    mean z^2)`` (the sign +1 at 0; the last four give the gradient of StepNet's features into the
    scale and the shift), each ``(B, C)`` float32: the float32 operands on the extension's path
    (sums taken in float64), the `jnp` reductions otherwise.
    """
    y, z = y.astype(jnp.float32), z.astype(jnp.float32)
    lead = (z.shape[0], z.shape[-1])
    scale, shift = (jnp.broadcast_to(jnp.asarray(v, jnp.float32), lead) for v in (scale, shift))
    if onednn.path_for(z.dtype) != "onednn":
        return reduced_moments(y, z, scale, shift)
    return _batched(y, z, scale, shift)


def reduced_moments(y, z, scale=1.0, shift=0.0):
    """`spatial_moments` as `jnp` reductions (the path without the extension)."""
    f = _per_pixel(scale) * z + _per_pixel(shift)
    sign = jnp.where(f >= 0, 1.0, -1.0)
    return tuple(v.mean(axis=(1, 2)) for v in (f, jnp.abs(f), jnp.square(f), y, jnp.abs(y), sign, sign * z, z, jnp.square(z)))


def _per_pixel(v):
    v = jnp.asarray(v)
    return v[:, None, None, :] if v.ndim == 2 else v


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
