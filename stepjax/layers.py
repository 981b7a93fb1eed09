"""The layers both the networks (`stepjax.models`) and the controllers (`stepjax.controllers`) are
built from (NHWC), initialised like the reference PyTorch code: convolutions, BatchNorm, the
shortcut projection, dense layers and the bottleneck MLP of the attention controllers."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from stepjax import kernels
from stepjax.ode.euler import SAVED

_NHWC = ("NHWC", "HWIO", "NHWC")


def conv2d(x, w, stride=1):
    """A bias-free NHWC/HWIO convolution with "same"-style padding ``k // 2`` (odd ``k``).

    On the CPU, float32 convolutions run in oneDNN through XLA's FFI when the extension is built
    (`stepjax.kernels.conv_same`, forward and both gradients; `stepjax.kernels.path_for` says
    which path runs). Otherwise a 1x1 kernel is a matrix product (after striding), which XLA's
    CPU backend runs several times faster than its generic convolution. A larger kernel is ``lax.conv_general_dilated``
    with a hand-written gradient (`_conv_same`): the same mathematics as XLA's own, but every
    convolution of the backward pass is stated in the canonical NHWC/HWIO form. XLA's CPU
    backend rewrites its own transposed convolutions into that form only outside loops; inside
    the backward of a `jax.lax.scan` (the deep stages of an `EulerStage`) it left them in a
    naive loop emitter that ran ResNet-164's step about 15x slower.

    **Arguments:**

    - `x`: ``(B, H, W, C)``; `w`: ``(k, k, C, O)``; `stride`: spatial stride.

    **Returns:**

    ``(B, ceil(H / stride), ceil(W / stride), O)``.
    """
    k = w.shape[0]
    if kernels.path_for(x.dtype) == "onednn":
        y = kernels.conv_same(x, w, stride)
    elif k == 1:
        y = _pointwise(x[:, ::stride, ::stride, :], w[0, 0])
    else:
        y = _conv_same(x, w, stride)
    # kept for the backward pass of a scanned stage: the outputs of larger kernels. A 1x1
    # convolution is one matrix product, cheaper to redo there than its output is to store in the
    # scan's stack and read back (docs/BENCHMARKS.md, "What a scanned stage stores").
    return y if k == 1 else checkpoint_name(y, SAVED)


def spatial_moments(y, f0):
    """Per-channel spatial means for a controller's features, the field given as a `ChannelAffine`
    ``f = scale * z + shift``: `stepjax.kernels.Moments` (of ``f``, ``|f|``, ``y``, ``|y|``, the
    variances of ``f`` and ``z``, and what a gradient into the map needs; one pass over `y` and ``z``
    on the CPU path, reductions elsewhere), each ``(B, C)`` float32. They are kept for the backward
    pass of a scanned stage (tagged like the convolution outputs), so that it does not read whole
    activations again to recompute them. A forward function: a caller that differentiates through
    it defines its own gradient (StepNet's features do)."""
    return kernels.Moments(*(checkpoint_name(m, SAVED) for m in kernels.spatial_moments(y, f0.z, f0.scale, f0.shift)))


@jax.custom_vjp
def _pointwise(x, w):
    return x @ w


def _pointwise_fwd(x, w):
    return x @ w, (x, w)


def _pointwise_bwd(residuals, dy):
    x, w = residuals
    dy = dy.astype(x.dtype)
    dx = dy @ w.T
    # kernel gradient as a batch of per-example products summed afterwards: XLA's CPU backend
    # turns the single (C, B*H*W) x (B*H*W, O) product into a transposed copy of dy first
    xb = x.reshape(x.shape[0], -1, x.shape[-1])
    dyb = dy.reshape(dy.shape[0], -1, dy.shape[-1])
    dw = jax.lax.dot_general(xb, dyb, (((1,), (1,)), ((0,), (0,)))).sum(0)
    return dx, dw.astype(w.dtype)


_pointwise.defvjp(_pointwise_fwd, _pointwise_bwd)


def _conv_fwd_only(x, w, stride):
    p = w.shape[0] // 2
    return jax.lax.conv_general_dilated(x, w, (stride, stride), ((p, p), (p, p)), dimension_numbers=_NHWC)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv_same(x, w, stride):
    return _conv_fwd_only(x, w, stride)


def _conv_same_fwd(x, w, stride):
    return _conv_fwd_only(x, w, stride), (x, w)


def _conv_same_bwd(stride, residuals, dy):
    x, w = residuals
    k, p = w.shape[0], w.shape[0] // 2
    (_, h, wd, _), (_, ho, wo, _) = x.shape, dy.shape
    dy = dy.astype(x.dtype)
    # input gradient: dy (dilated by the stride) correlated with the flipped, transposed kernel
    w_t = jnp.flip(w, (0, 1)).transpose(0, 1, 3, 2)
    pads = [(k - 1 - p, n + p - stride * (m - 1) - 1) for n, m in ((h, ho), (wd, wo))]
    dx = jax.lax.conv_general_dilated(
        dy, w_t, (1, 1), pads, lhs_dilation=(stride, stride), dimension_numbers=_NHWC
    )
    # kernel gradient: channels of x as the batch, the batch as the contracted feature axis, and
    # dy (dilated by the stride) as a (ho, wo, B, O) kernel
    pads = [(p, k + stride * (m - 1) - n - p) for n, m in ((h, ho), (wd, wo))]
    dw = jax.lax.conv_general_dilated(
        x.transpose(3, 1, 2, 0), dy.transpose(1, 2, 0, 3), (1, 1), pads,
        rhs_dilation=(stride, stride), dimension_numbers=_NHWC,
    ).transpose(1, 2, 0, 3)
    return dx, dw.astype(w.dtype)


_conv_same.defvjp(_conv_same_fwd, _conv_same_bwd)


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
        return conv2d(x.astype(self.dtype), self.kernel[...].astype(self.dtype), self.stride)


def batch_norm(channels, *, rngs, dtype=jnp.float32):
    """BatchNorm as in PyTorch (momentum 0.1 there, 0.9 here; eps 1e-5); gamma 1, beta 0."""
    return BatchNorm(channels, momentum=0.9, epsilon=1e-5, dtype=dtype, rngs=rngs)


class BatchNorm(nnx.BatchNorm):
    """`flax.nnx.BatchNorm` (the same variables, statistics, running averages and forward values)
    whose training-mode normalisation over all axes but the last has a hand-written gradient
    (`normalize_batch`). Other uses (running averages, a mask, another axis, a named axis, no scale or
    bias) are flax's own."""

    def __call__(self, x, use_running_average=None, *, mask=None):
        running = self.use_running_average if use_running_average is None else use_running_average
        if running or mask is not None or not self._normalises_channels():
            return super().__call__(x, use_running_average, mask=mask)
        x, scale, bias = self._promoted(x)
        self._update_averages(*(jax.lax.stop_gradient(v) for v in batch_moments(x)))
        return normalize_batch(x, scale, bias, self.epsilon).astype(self.dtype or x.dtype)

    def affine(self, x):
        """The map as it applies to `x`, ``self(x) == scale * x + shift`` up to float32 rounding:
        per-channel ``(scale, shift)``, from the batch's statistics (differentiable, and the
        running averages updated as `__call__` does) in training, from the running averages in
        evaluation.

        **Returns:**

        ``(scale, shift)``, each ``(C,)`` float32 (or wider, as `x`).
        """
        if not self._normalises_channels():
            raise NotImplementedError("BatchNorm.affine: only per-channel statistics over all other axes, with scale and bias.")
        x, scale, bias = self._promoted(x)
        if self.use_running_average:
            mean, var = self.mean[...], self.var[...]
        else:
            mean, var = batch_moments(x)
            self._update_averages(jax.lax.stop_gradient(mean), jax.lax.stop_gradient(var))
        a = scale * jax.lax.rsqrt(var + self.epsilon)
        return a, bias - mean * a

    def _normalises_channels(self):
        return self.axis == -1 and self.axis_name is None and self.scale is not None and self.bias is not None \
            and self.use_fast_variance

    def _promoted(self, x):
        x, scale, bias = self.promote_dtype((x, self.scale[...], self.bias[...]), dtype=self.dtype)
        return x.astype(jnp.promote_types(x.dtype, jnp.float32)), scale, bias

    def _update_averages(self, mean, var):
        self.mean[...] = self.momentum * self.mean[...] + (1 - self.momentum) * mean
        self.var[...] = self.momentum * self.var[...] + (1 - self.momentum) * var


def batch_moments(x):
    """Mean and (biased) variance of `x` over all axes but the last, from its first two moments (as
    flax's ``use_fast_variance``)."""
    axes = tuple(range(x.ndim - 1))
    mean = x.mean(axes)
    return mean, jnp.maximum((x * x).mean(axes) - mean * mean, 0.0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def normalize_batch(x, scale, bias, epsilon):
    """``(x - mean) * rsqrt(var + epsilon) * scale + bias`` with the batch's own statistics over all
    axes but the last (`batch_moments`), as flax's BatchNorm computes it in training.

    Its gradient is written out: two passes over the activations (the sums of ``dy`` and ``dy * x``
    per channel, then ``dx = a dy + b x + c`` with per-channel ``a, b, c``) where XLA's CPU backend
    made about twice as many fusions of the autodiff of the statistics (docs/BENCHMARKS.md,
    "BatchNorm's gradient in two passes")."""
    return _normalize_fwd(x, scale, bias, epsilon)[0]


def _normalize_fwd(x, scale, bias, epsilon):
    mean, var = batch_moments(x)
    rstd = jax.lax.rsqrt(var + epsilon)
    return (x - mean) * (rstd * scale) + bias, (x, mean, rstd, scale)


def _normalize_bwd(epsilon, residuals, dy):
    x, mean, rstd, scale = residuals
    axes = tuple(range(x.ndim - 1))
    n = math.prod(x.shape[:-1])
    dy_sum, dy_x_sum = dy.sum(axes), (dy * x).sum(axes)
    dy_xhat_sum = rstd * (dy_x_sum - mean * dy_sum)  # sum of dy * (x - mean) * rstd: the scale's gradient
    a = rstd * scale
    b = -a * rstd * dy_xhat_sum / n
    c = -a * dy_sum / n - mean * b
    # scale and bias share a dtype (the module promotes them together), bfloat16 in a bfloat16 model
    return dy * a + x * b + c, dy_xhat_sum.astype(scale.dtype), dy_sum.astype(scale.dtype)


normalize_batch.defvjp(_normalize_fwd, _normalize_bwd)


class Projection(nnx.Module):
    """The change of variables of a shape-changing step: conv1x1(stride) [+ BN]."""

    def __init__(self, in_channels, out_channels, *, stride, rngs, norm=True, dtype=jnp.float32):
        self.conv = Conv(in_channels, out_channels, 1, stride=stride, rngs=rngs, dtype=dtype)
        self.norm = batch_norm(out_channels, rngs=rngs, dtype=dtype) if norm else None

    def __call__(self, x):
        y = self.conv(x)
        return y if self.norm is None else self.norm(y)


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
