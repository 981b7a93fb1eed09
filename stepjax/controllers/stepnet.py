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

import jax
import jax.numpy as jnp
from flax import nnx

from stepjax.layers import BottleneckMLP, as_channel_step
from stepjax.ode.controller import StepController


def step_features(y0, f0, eps=1e-5):
    """Per-channel stiffness features of one step, each ``(B, C)`` in float32.

    **Returns:**

    The tuple ``(GAP(f), GAP(y), r / (1 + r), std(f))``, with the relative increment
    ``r = GAP(|f|) / GAP(|y|)``. A tuple, not a stacked array: on XLA's CPU backend the stacked
    form made these features and their mix three times slower forward and backward (one
    ResNet-20 block at batch 16; the whole training step changed within measurement noise).

    The bounded form matters: a channel that a ReLU has zeroed has ``GAP(|y|) = 0``, and the raw
    ratio ``GAP(|f|) / (GAP(|y|) + eps)`` then reaches ``1e5``; its gradient into the feature mix
    made ResNet-164 with StepNet diverge at the paper's learning rate (0.1, no warm-up).
    """
    f = f0.astype(jnp.float32)
    y = y0.astype(jnp.float32)
    mean_f = f.mean(axis=(1, 2))
    abs_f = jnp.abs(f).mean(axis=(1, 2))
    relative = abs_f / (abs_f + jnp.abs(y).mean(axis=(1, 2)) + eps)
    spread = jnp.sqrt(f.var(axis=(1, 2)) + eps)
    return mean_f, y.mean(axis=(1, 2)), relative, spread


class StepNet(StepController):
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

    def adapt_step_size(self, t0, y0, f0, controller_state):
        features = step_features(y0, f0)
        if self.history:
            h_prev, mean_f_prev, started = controller_state
            secant = started * (features[0] - mean_f_prev)
            features = (*features, h_prev, secant)
        z = sum(w * x for w, x in zip(self.feature_mix[...], features)) + self.feature_bias[...]
        h = jax.nn.sigmoid(self.mlp(z))
        if self.history:
            controller_state = (h, features[0], jnp.ones((), jnp.float32))
        return as_channel_step(h), controller_state
