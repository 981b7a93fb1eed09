"""Published self-attention modules read as step-size controllers.

Each module's gate multiplies the residual branch, so it is the step size ``h`` of an explicit
Euler step: channel attention gives one step per channel, spatial attention one per location.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from stepjax.errors import UserError
from stepjax.layers import BottleneckMLP, conv2d
from stepjax.ode.controller import ChannelGate, StageShared, StepController, as_channel_step


class SqueezeExcitation(ChannelGate):
    """SE (Hu et al. 2018): ``h = sigmoid(MLP(GAP(f)))`` per channel; reduction 16."""

    def __init__(self, channels, *, rngs, reduction=16):
        self.mlp = BottleneckMLP(channels, reduction, rngs=rngs)

    def gate(self, t0, y0, f0, controller_state, *, nonnegative_state=False):
        return jax.nn.sigmoid(self.mlp(f0.spatial_mean())), controller_state


class ChannelStep(ChannelGate):
    """A trained step per channel that does not look at the input: ``h = sigmoid(w)``, one ``w``
    per channel and block. Not an attention module but the control for one: channel attention's
    range (0, 1) and shape, without adaptation, i.e. a fixed step schedule learned per channel. A
    trained gate that hardly varies with the image (StepNet at depth, docs/ANALYSIS.md 3.9) is in
    effect this controller.

    **Arguments:**

    - `channels`: width of the stage.
    - `rngs`: unused (no random initialisation).
    - `init_value`: the initial step of every channel, in (0, 1); 0.5 (``w = 0``) by default, the
      step an untrained SE gate sits near.
    """

    def __init__(self, channels, *, rngs, init_value=0.5):
        del rngs
        if not 0.0 < init_value < 1.0:
            raise UserError(f"init_value={init_value}: the step of a sigmoid gate lies in (0, 1); choose one inside.")
        self.logit = nnx.Param(jnp.full((channels,), math.log(init_value / (1.0 - init_value)), jnp.float32))

    def gate(self, t0, y0, f0, controller_state, *, nonnegative_state=False):
        return jnp.broadcast_to(jax.nn.sigmoid(self.logit[...]), (f0.z.shape[0], f0.z.shape[-1])), controller_state


class CBAM(StepController):
    """CBAM (Woo et al. 2018): channel step from avg- and max-pooled f, then a spatial step from a
    7x7 conv (+BN) over channel-pooled maps; ``h = h_channel * h_spatial``."""

    def __init__(self, channels, *, rngs, reduction=16, kernel_size=7):
        self.mlp = BottleneckMLP(channels, reduction, rngs=rngs)
        std = math.sqrt(2.0 / (kernel_size * kernel_size))
        self.spatial_kernel = nnx.Param(std * jax.random.normal(rngs.params(), (kernel_size, kernel_size, 2, 1)))
        self.spatial_norm = nnx.BatchNorm(1, momentum=0.9, epsilon=1e-5, rngs=rngs)

    def adapt_step_size(self, t0, y0, f0, controller_state):
        f = f0.astype(jnp.float32)
        h_channel = jax.nn.sigmoid(self.mlp(f.mean(axis=(1, 2))) + self.mlp(f.max(axis=(1, 2))))
        g = f * as_channel_step(h_channel)
        pooled = jnp.stack([g.mean(axis=-1), g.max(axis=-1)], axis=-1)
        # "same" padding; conv2d's gradient stays fast inside the scan over blocks
        s = conv2d(pooled, self.spatial_kernel[...])
        h_spatial = jax.nn.sigmoid(self.spatial_norm(s))
        return as_channel_step(h_channel) * h_spatial, controller_state


def eca_kernel_size(channels, gamma=2, b=1):
    """ECA's adaptive kernel size: the odd number nearest ``log2(C)/gamma + b/gamma``."""
    k = int(abs(math.log2(channels) / gamma + b / gamma))
    return k if k % 2 else k + 1


class ECA(ChannelGate):
    """ECA (Wang et al. 2020): ``h = sigmoid(conv1d_k(GAP(f)))`` across channels, no bias."""

    def __init__(self, channels, *, rngs):
        k = eca_kernel_size(channels)
        self.kernel = nnx.Param(jax.random.uniform(rngs.params(), (k,), minval=-(k**-0.5), maxval=k**-0.5))

    def gate(self, t0, y0, f0, controller_state, *, nonnegative_state=False):
        mean_f0 = f0.spatial_mean()
        k = self.kernel[...].shape[0]
        padded = jnp.pad(mean_f0, ((0, 0), (k // 2, k // 2)))
        z = sum(self.kernel[...][i] * padded[:, i : i + mean_f0.shape[1]] for i in range(k))
        return jax.nn.sigmoid(z), controller_state


class SRM(StepController):
    """SRM (Lee et al. 2019): style pooling (mean, std per channel), a channel-wise linear map
    of the two styles, BN, sigmoid."""

    def __init__(self, channels, *, rngs):
        self.style_weight = nnx.Param(jnp.zeros((2, channels)))
        self.norm = nnx.BatchNorm(channels, momentum=0.9, epsilon=1e-5, rngs=rngs)

    def adapt_step_size(self, t0, y0, f0, controller_state):
        f = f0.astype(jnp.float32)
        mean = f.mean(axis=(1, 2))
        std = jnp.sqrt(f.var(axis=(1, 2)) + 1e-5)
        z = self.style_weight[...][0] * mean + self.style_weight[...][1] * std
        return as_channel_step(jax.nn.sigmoid(self.norm(z))), controller_state


class DIACell(nnx.Module):
    """DIA's LSTM-like cell, one per stage; input and hidden paths each ``C -> C/r -> 4C``."""

    def __init__(self, channels, *, rngs, reduction=4):
        self.input_path = BottleneckMLP(channels, reduction, 4 * channels, rngs=rngs, param_type=StageShared)
        self.hidden_path = BottleneckMLP(channels, reduction, 4 * channels, rngs=rngs, param_type=StageShared)

    def __call__(self, x, state):
        h, c = state
        i, f, g, o = jnp.split(self.input_path(x) + self.hidden_path(h), 4, axis=-1)
        c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
        h = jax.nn.sigmoid(o) * jax.nn.sigmoid(c)
        return h, (h, c)


class DIA(ChannelGate):
    """DIA (Huang et al. 2020): one LSTM cell shared by the stage; its ``(h, c)`` is the
    controller state, zero at the start of each stage, and ``h`` is the channel step."""

    def __init__(self, channels, *, rngs, reduction=4):
        self.shared = DIACell(channels, rngs=rngs, reduction=reduction)

    def init(self, y0):
        zeros = jnp.zeros((y0.shape[0], y0.shape[-1]), jnp.float32)
        return (zeros, zeros)

    def gate(self, t0, y0, f0, controller_state, *, nonnegative_state=False):
        return self.shared(f0.spatial_mean(), controller_state)
