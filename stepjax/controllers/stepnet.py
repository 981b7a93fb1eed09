"""StepNet: a learned, stiffness-aware step-size controller -- OUR RECONSTRUCTION.

The exact module of Huang et al. (ICCV 2023) is not public. This reconstruction follows the
constraints that are known (a multiplicative per-channel step on the residual branch, a drop-in
attention module, finer stiffness information than SE's ``GAP(f)``) and classical step-size
control:

- per-channel features of the step: the derivative summary ``GAP(f)``, the state summary
  ``GAP(y)``, the relative increment ``r = GAP(|f|) / GAP(|y|)`` taken bounded as ``r / (1 + r)``,
  and the spatial spread ``std(f)``;
- with ``history=True`` also the controller state carried along the stage: the previous step
  size and the change of the derivative summary since the previous step (a secant estimate of
  the Jacobian's action, the classical stiffness signal);
- a per-channel linear mix of the features (initialised to pass ``GAP(f)`` alone, so an
  untrained StepNet computes exactly what SE computes), then SE's excitation MLP and a sigmoid.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from stepjax.layers import BottleneckMLP, spatial_moments
from stepjax.ode.controller import ChannelAffine, ChannelGate


def step_features(y0, f0, eps=1e-5, *, nonnegative_state=False):
    """Per-channel stiffness features of one step, each ``(B, C)`` in float32.

    **Arguments:**

    - `y0`: the state, ``(B, H, W, C)``.
    - `f0`: the field, an array or a `ChannelAffine` (a field folded into its step: then ``f`` is
      never formed, its moments come from ``z`` and the map, `stepjax.layers.spatial_moments`).
    - `eps`: the relative increment's and the spread's regulariser.
    - `nonnegative_state`: every element of `y0` is >= 0 (a post-activation network's state). The
      features and their gradient are the same (``|y| = y``, and ``d|y|/dy = 1`` at 0 as JAX has
      it), but the gradient into ``y`` is one value per example and channel, which XLA adds where
      the state's cotangent is formed instead of reading ``y`` again there. Wrong gradients if an
      element is negative.

    **Returns:**

    The tuple ``(GAP(f), GAP(y), r / (1 + r), std(f))``, with the relative increment
    ``r = GAP(|f|) / GAP(|y|)``. A tuple, not a stacked array: on XLA's CPU backend the stacked
    form made these features and their mix three times slower forward and backward (one
    ResNet-20 block at batch 16; the whole training step changed within measurement noise).

    The bounded form matters: a channel that a ReLU has zeroed has ``GAP(|y|) = 0``, and the raw
    ratio ``GAP(|f|) / (GAP(|y|) + eps)`` then reaches ``1e5``; its gradient into the feature mix
    made ResNet-164 with StepNet diverge at the paper's learning rate (0.1, no warm-up).

    All four come from one set of moments (`stepjax.layers.spatial_moments`: one pass over ``y``
    and ``z`` in the CPU extension, independent reductions without it), none of which reads a
    broadcast operand; the variance is taken about a pivot (``z`` at the example's first pixel),
    so that its float32 cancellation grows with the pivot's distance from the mean in units of the
    spread, not with the mean's. ``f.var`` subtracts the mean inside its reduction, and XLA's CPU
    backend runs such a reduction slower than a plain one: the stage-1 features of the deep
    protocol took 5.1 ms that way against 3.9 ms (docs/BENCHMARKS.md).

    The gradient is written out (`_features_bwd`: the same mathematics as autodiff's, with
    ``d|x|/dx = 1`` at 0 as JAX has it). From autodiff's form, XLA's CPU backend fused the whole
    expression into each of the gradient's several consumers and computed it three times over:
    the deep StepNet step (ResNet-164 at half width, batch 64) took 3.23 s against 2.49 s. Its
    part into the map of a folded field (the sums of ``df`` and ``df z`` over the pixels) comes
    from the moments too, so that ``df`` is not written out for two reductions.
    """
    if not isinstance(f0, ChannelAffine):
        f0 = ChannelAffine.identity(f0)
    lead = (f0.z.shape[0], f0.z.shape[-1])
    scale, shift = (jnp.broadcast_to(v, lead).astype(jnp.float32) for v in (f0.scale, f0.shift))
    return _features(y0.astype(jnp.float32), f0.z.astype(jnp.float32), scale, shift, eps, nonnegative_state)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _features(y, z, scale, shift, eps, nonnegative_state):
    return _features_fwd(y, z, scale, shift, eps, nonnegative_state)[0]


def _features_fwd(y, z, scale, shift, eps, nonnegative_state):
    del nonnegative_state
    moments = spatial_moments(y, ChannelAffine(z, scale, shift))
    spread = jnp.sqrt(moments.var_f + eps)
    features = (moments.f, moments.y, moments.abs_f / (moments.abs_f + moments.abs_y + eps), spread)
    return features, (y, z, scale, shift, moments, spread)


def _features_bwd(eps, nonnegative_state, residuals, cotangents):
    """The cotangents of ``(y, z, scale, shift)`` from those of the four features: of ``y`` and
    ``f = scale z + shift`` (``f`` computed again where it is read, not stored), then through the map.

    Each is ``offset + slope * sign(x) (+ scale * (x - mean))`` with ``(B, C)`` coefficients, and every
    coefficient is written as a division by a value computed at run time (``spread * n``, or
    ``n`` times the relative increment's squared denominator). XLA's CPU backend does not fuse a
    division into a loop that would repeat it per pixel, so the coefficients are computed once.
    Written with ``g_mean / n`` (a multiplication by a constant), the cotangents' sums, with
    dynamic slices of the scan's stacked residuals, were fused into the loop over every pixel and
    repeated there: that one backward fusion of the deep StepNet step took more time than any of
    its convolutions.
    """
    y, z, scale, shift, moments, spread = residuals
    g_mean_f, g_mean_y, g_relative, g_spread = cotangents
    n = z.shape[1] * z.shape[2]
    total = jnp.square(moments.abs_f + moments.abs_y + eps)
    by_total, by_spread = total * n, spread * n

    def per_pixel(v):  # (B, C) -> (B, 1, 1, C)
        return v[:, None, None, :]

    f = per_pixel(scale) * z + per_pixel(shift)
    slope_f = per_pixel(g_relative * (moments.abs_y + eps) / by_total)
    df = (per_pixel(g_mean_f * spread / by_spread) + jnp.where(f >= 0, slope_f, -slope_f)
          + per_pixel(g_spread / by_spread) * (f - per_pixel(moments.f)))
    offset_y, slope_y = g_mean_y * total / by_total, -g_relative * moments.abs_f / by_total
    if nonnegative_state:  # sign(y) = 1 everywhere
        dy = jnp.broadcast_to(per_pixel(offset_y + slope_y), y.shape)
    else:
        dy = per_pixel(offset_y) + jnp.where(y >= 0, per_pixel(slope_y), -per_pixel(slope_y))
    # sum(df) and sum(df z) over the pixels from the moments: two reductions of df would have it
    # written out; sum(f - mean_f) is 0, sum((f - mean_f) z) is n scale var(z)
    coefficient_f, g_variance = g_relative * (moments.abs_y + eps) / total, g_spread / spread
    d_shift = g_mean_f + coefficient_f * moments.sign_f
    d_scale = g_mean_f * moments.z + coefficient_f * moments.sign_f_z + g_variance * scale * moments.var_z
    return dy, per_pixel(scale) * df, d_scale, d_shift


_features.defvjp(_features_fwd, _features_bwd)


class StepNet(ChannelGate):
    """Stiffness-aware step-size controller (our reconstruction; see the module docstring).

    **Arguments:**

    - `channels`: width of the stage.
    - `rngs`: random stream.
    - `reduction`: excitation MLP reduction (16, as SE).
    - `history`: carry the previous step and derivative summary along the stage.
    """

    def __init__(self, channels, *, rngs, reduction=16, history=True):
        self.history = history
        num_features = 6 if history else 4
        mix = jnp.zeros((num_features, channels)).at[0].set(1.0)
        self.feature_mix = nnx.Param(mix)
        self.feature_bias = nnx.Param(jnp.zeros((channels,)))
        self.mlp = BottleneckMLP(channels, reduction, rngs=rngs)

    def init(self, y0):
        if not self.history:
            return ()
        ones = jnp.ones((y0.shape[0], y0.shape[-1]), jnp.float32)
        return (ones, jnp.zeros_like(ones), jnp.zeros((), jnp.float32))

    def gate(self, t0, y0, f0, controller_state, *, nonnegative_state=False):
        features = step_features(y0, f0, nonnegative_state=nonnegative_state)
        if self.history:
            h_prev, mean_f_prev, started = controller_state
            secant = started * (features[0] - mean_f_prev)
            features = (*features, h_prev, secant)
        z = sum(w * x for w, x in zip(self.feature_mix[...], features)) + self.feature_bias[...]
        h = jax.nn.sigmoid(self.mlp(z))
        if self.history:
            controller_state = (h, features[0], jnp.ones((), jnp.float32))
        return h, controller_state
