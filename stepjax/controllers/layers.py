"""Small layers shared by the attention controllers, initialised like the reference PyTorch code."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def _uniform(bound: float):
    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class Dense(nnx.Module):
    """``x @ W + b`` with PyTorch's default ``nn.Linear`` initialisation, U(+-1/sqrt(fan_in)).

    **Arguments:**

    - `in_features`, `out_features`: sizes.
    - `use_bias`: add a bias.
    - `param_type`: variable type of the parameters (`StageShared` for a cell shared by a stage).
    - `rngs`: random stream.
    """

    def __init__(self, in_features, out_features, *, rngs, use_bias=True, param_type=nnx.Param):
        init = _uniform(in_features**-0.5)
        self.kernel = param_type(init(rngs.params(), (in_features, out_features)))
        self.bias = param_type(init(rngs.params(), (out_features,))) if use_bias else None

    def __call__(self, x):
        y = x @ self.kernel[...].astype(x.dtype)
        return y if self.bias is None else y + self.bias[...].astype(x.dtype)


class BottleneckMLP(nnx.Module):
    """``Dense(C -> C/r) -> ReLU -> Dense(-> out)``: the excitation MLP of SE, CBAM and DIA."""

    def __init__(self, channels, reduction, out_features=None, *, rngs, param_type=nnx.Param):
        hidden = max(1, channels // reduction)
        self.reduce = Dense(channels, hidden, rngs=rngs, param_type=param_type)
        self.expand = Dense(hidden, out_features or channels, rngs=rngs, param_type=param_type)

    def __call__(self, x):
        return self.expand(jax.nn.relu(self.reduce(x)))


def spatial_mean(x):
    """Global average pool of an NHWC tensor to ``(B, C)`` in float32."""
    return x.astype(jnp.float32).mean(axis=(1, 2))


def as_channel_step(gate):
    """A ``(B, C)`` gate as a per-channel step ``(B, 1, 1, C)``."""
    return gate[:, None, None, :]
