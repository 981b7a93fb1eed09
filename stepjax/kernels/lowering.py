"""A lowering for XLA's CPU backend: no copy where `jax.checkpoint` rounds a stored value to its own
precision.

`jax.checkpoint` puts ``reduce_precision(x, exponent_bits, mantissa_bits)`` of `x`'s own format on
every value it stores for the backward pass, against excess precision (a backend computing
bfloat16 in float32 would otherwise give the forward and the recomputing backward pass different
values). For float32 and float64 on the CPU that rounds nothing, but XLA's CPU compiler keeps it,
and where the stored value feeds a library fusion (the BatchNorm statistics of a convolution's
output, `stepjax.ode.euler`'s stored values) it becomes a copy of the whole activation.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
from jax.extend.mlir import ir, lower_with_sharding_in_types
from jax.extend.mlir.dialects import stablehlo
from jax.interpreters import mlir

_EXACT = (np.dtype(np.float32), np.dtype(np.float64))  # no excess precision for these on the CPU


def _reduce_precision_cpu(ctx, operand, *, exponent_bits, mantissa_bits):
    dtype = np.dtype(ctx.avals_in[0].dtype)
    if dtype in _EXACT and (exponent_bits, mantissa_bits) == (np.finfo(dtype).nexp, np.finfo(dtype).nmant):
        return [operand]
    i32 = ir.IntegerType.get_signless(32)
    out = stablehlo.reduce_precision(operand, ir.IntegerAttr.get(i32, exponent_bits), ir.IntegerAttr.get(i32, mantissa_bits))
    return [lower_with_sharding_in_types(ctx, out, ctx.avals_out[0])]


@functools.cache
def drop_exact_reduce_precision() -> None:
    """On the CPU backend, lower `jax.lax.reduce_precision` to its operand where it keeps every
    bit (float32 to 8 exponent and 23 mantissa bits, float64 to 11 and 52); every other rounding
    lowers as before. Registered once per process; other backends are not touched."""
    mlir.register_lowering(jax.lax.reduce_precision_p, _reduce_precision_cpu, platform="cpu")
