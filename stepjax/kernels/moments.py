"""The spatial moments of one Euler step that a step-size controller reads, in one pass on the CPU.

`spatial_moments(y, f)` gives, per example and channel, the means over the pixels of ``f``,
``|f|``, ``f^2``, ``y`` and ``|y|``. On the path of the CPU extension (`stepjax.kernels.path_for`)
one C++ handler (``csrc/spatial_moments.cc``) reads ``y`` and ``f`` once; elsewhere, and where the
extension is not built, five `jnp` reductions compute the same means. It is a forward function
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
NUM_MOMENTS = 5  # f, |f|, f^2, y, |y|


def spatial_moments(y, f):
    """Per-channel spatial means of one step's state `y` and field `f`, both ``(B, H, W, C)``.

    **Returns:**

    ``(mean f, mean |f|, mean f^2, mean y, mean |y|)``, each ``(B, C)`` float32: the float32
    operands on the extension's path (sums taken in float64), the `jnp` reductions otherwise.
    """
    y, f = y.astype(jnp.float32), f.astype(jnp.float32)
    if onednn.path_for(f.dtype) != "onednn":
        return reduced_moments(y, f)
    return _batched(y, f)


def reduced_moments(y, f):
    """`spatial_moments` as five `jnp` reductions (the path without the extension)."""
    return tuple(v.mean(axis=(1, 2)) for v in (f, jnp.abs(f), jnp.square(f), y, jnp.abs(y)))


def _ffi(y, f, devices=None):
    out = jax.ShapeDtypeStruct((y.shape[0], y.shape[3]), jnp.float32)
    call = jax.ffi.ffi_call(TARGET, (out,) * NUM_MOMENTS, vmap_method="sequential")
    return tuple(call(y, f, threads=np.int64(onednn.threads(devices))))


@custom_partitioning
def _partitioned(y, f):  # lowered as it is only on one device
    return _ffi(y, f, devices=1)


def _partition(mesh, arg_shapes, result_shape):
    """Each device takes the moments of its own examples: the batch stays split, nothing is summed."""
    spec = arg_shapes[0].sharding.spec
    split = NamedSharding(mesh, P(spec[0] if len(spec) else None))
    return mesh, lambda y, f: _ffi(y, f, devices=mesh.size), (split,) * NUM_MOMENTS, (split, split)


_partitioned.def_partition(_partition, sharding_rule="b h w c, b h w c -> " + ", ".join(["b c"] * NUM_MOMENTS),
                           need_replication_factors=("h", "w", "c"))


@custom_vmap
def _batched(y, f):
    return _partitioned(y, f)


@_batched.def_vmap
def _merged(axis_size, in_batched, y, f):
    """Under `vmap` the mapped axis joins the batch: the moments are per example."""
    y, f = (v if batched else jnp.broadcast_to(v, (axis_size, *v.shape)) for v, batched in zip((y, f), in_batched))
    lead = (axis_size, y.shape[1])
    moments = _batched(y.reshape(-1, *y.shape[2:]), f.reshape(-1, *f.shape[2:]))
    return tuple(m.reshape(*lead, m.shape[-1]) for m in moments), (True,) * NUM_MOMENTS
