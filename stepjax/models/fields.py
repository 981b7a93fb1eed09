"""Residual branches as vector fields: each returns ``f(y)``, never ``y + f(y)``."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from stepjax.layers import Conv, batch_norm
from stepjax.ode import ChannelAffine


class ConvBranch(nnx.Module):
    """A residual branch of convolutions and BatchNorms (`convs`, `norms`), post-activation
    (conv-BN-ReLU ... conv-BN) or, with `preact`, pre-activation (BN-ReLU-conv ...)."""

    def __call__(self, y):
        return _preact_chain(self.convs, self.norms, y) if self.preact else _postact_chain(self.convs, self.norms, y)

    @property
    def affine_output(self):
        """``y -> ChannelAffine``, the field as its last BatchNorm's affine map of the last
        convolution's output, for a post-activation field; None for a pre-activation one, which
        ends in a convolution."""
        return None if self.preact else functools.partial(_postact_affine, self.convs, self.norms)


class BottleneckField(ConvBranch):
    """Post-activation bottleneck: conv1x1-BN-ReLU-conv3x3(stride)-BN-ReLU-conv1x1-BN.

    **Arguments:**

    - `in_channels`: input width; `planes`: bottleneck width; output is ``4 * planes``.
    - `stride`: stride of the 3x3 convolution.
    - `preact`: pre-activation order instead (BN-ReLU-conv1x1-BN-ReLU-conv3x3-BN-ReLU-conv1x1).
    """

    expansion = 4

    def __init__(self, in_channels, planes, *, stride=1, preact=False, rngs, dtype=jnp.float32):
        out = planes * self.expansion
        self.preact = preact
        self.convs = nnx.List([
            Conv(in_channels, planes, 1, rngs=rngs, dtype=dtype),
            Conv(planes, planes, 3, stride=stride, rngs=rngs, dtype=dtype),
            Conv(planes, out, 1, rngs=rngs, dtype=dtype),
        ])
        norm_widths = (in_channels, planes, planes) if preact else (planes, planes, out)
        self.norms = nnx.List([batch_norm(c, rngs=rngs, dtype=dtype) for c in norm_widths])


class BasicField(ConvBranch):
    """Post-activation basic block: conv3x3(stride)-BN-ReLU-conv3x3-BN (pre-activation if asked)."""

    expansion = 1

    def __init__(self, in_channels, planes, *, stride=1, preact=False, rngs, dtype=jnp.float32):
        self.preact = preact
        self.convs = nnx.List([
            Conv(in_channels, planes, 3, stride=stride, rngs=rngs, dtype=dtype),
            Conv(planes, planes, 3, rngs=rngs, dtype=dtype),
        ])
        norm_widths = (in_channels, planes) if preact else (planes, planes)
        self.norms = nnx.List([batch_norm(c, rngs=rngs, dtype=dtype) for c in norm_widths])


def zero_last_layer(field) -> None:
    """Make `field` the zero vector field at initialisation, so that its Euler step starts as the
    identity map (Goyal et al. 2017's zero-initialised residual): the last BatchNorm's scale of a
    post-activation field, the last convolution of a pre-activation one (which ends in a conv)."""
    last = field.convs[-1].kernel if field.preact else field.norms[-1].scale
    last.set_value(jnp.zeros_like(last.get_value()))


def _postact_chain(convs, norms, y):
    return norms[-1](_postact_feature(convs, norms, y))


def _postact_affine(convs, norms, y):
    z = _postact_feature(convs, norms, y)
    return ChannelAffine(z, *norms[-1].affine(z))


def _postact_feature(convs, norms, y):
    """The branch up to its last BatchNorm: conv(-BN-ReLU-conv)*."""
    for conv, norm in zip(convs[:-1], norms[:-1]):
        y = jax.nn.relu(norm(conv(y)))
    return convs[-1](y)


def _preact_chain(convs, norms, y):
    for conv, norm in zip(convs, norms):
        y = conv(jax.nn.relu(norm(y)))
    return y


FIELDS = {"bottleneck": BottleneckField, "basic": BasicField}
