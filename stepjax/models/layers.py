"""Convolution and normalisation layers of the CIFAR/ImageNet ResNets (NHWC)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx


class Conv(nnx.Module):
    """A bias-free 2-D convolution, initialised like the reference code: N(0, 2/(k*k*out)).

    A 1x1 convolution is computed as a matrix product (after striding), which XLA's CPU backend
    runs several times faster than its generic convolution.

    **Arguments:**

    - `in_channels`, `out_channels`, `kernel_size`, `stride`: as usual; padding is ``k // 2``.
    - `rngs`: random stream.
    - `dtype`: compute dtype (parameters stay float32).
    """

    def __init__(self, in_channels, out_channels, kernel_size, *, stride=1, rngs, dtype=jnp.float32):
        std = math.sqrt(2.0 / (kernel_size * kernel_size * out_channels))
        shape = (kernel_size, kernel_size, in_channels, out_channels)
        self.kernel = nnx.Param(std * jax.random.normal(rngs.params(), shape))
        self.stride = stride
        self.dtype = dtype

    def __call__(self, x):
        w = self.kernel[...].astype(self.dtype)
        x = x.astype(self.dtype)
        k = w.shape[0]
        if k == 1:
            return x[:, :: self.stride, :: self.stride, :] @ w[0, 0]
        pad = ((k // 2, k // 2), (k // 2, k // 2))
        return jax.lax.conv_general_dilated(
            x, w, (self.stride, self.stride), pad, dimension_numbers=("NHWC", "HWIO", "NHWC")
        )


def batch_norm(channels, *, rngs, dtype=jnp.float32):
    """BatchNorm as in PyTorch (momentum 0.1 there, 0.9 here; eps 1e-5); gamma 1, beta 0."""
    return nnx.BatchNorm(channels, momentum=0.9, epsilon=1e-5, dtype=dtype, rngs=rngs)


class Projection(nnx.Module):
    """The change of variables of a shape-changing step: conv1x1(stride) [+ BN]."""

    def __init__(self, in_channels, out_channels, *, stride, rngs, norm=True, dtype=jnp.float32):
        self.conv = Conv(in_channels, out_channels, 1, stride=stride, rngs=rngs, dtype=dtype)
        self.norm = batch_norm(out_channels, rngs=rngs, dtype=dtype) if norm else None

    def __call__(self, x):
        y = self.conv(x)
        return y if self.norm is None else self.norm(y)
