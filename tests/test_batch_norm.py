"""`stepjax.layers.BatchNorm`: flax's BatchNorm with a hand-written training-mode gradient. The
oracle is `flax.nnx.BatchNorm` and JAX's autodiff of it: the same forward values and running
statistics bit for bit, the same gradients to fp32 rounding, in and out of `jit`, `scan`,
`jax.checkpoint` and `vmap`, and the same training step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import stepjax.layers as layers
from stepjax.layers import BatchNorm, normalize_batch


def _pair(channels, *, scale=None, bias=None):
    """A flax BatchNorm and ours with the same (non-trivial) scale, bias and running statistics."""
    out = []
    for cls in (nnx.BatchNorm, BatchNorm):
        norm = cls(channels, momentum=0.9, epsilon=1e-5, rngs=nnx.Rngs(0))
        norm.scale[...] = jnp.linspace(0.5, 1.5, channels) if scale is None else scale
        norm.bias[...] = jnp.linspace(-1.0, 1.0, channels) if bias is None else bias
        norm.mean[...] = jnp.linspace(-0.1, 0.1, channels)
        norm.var[...] = jnp.linspace(0.9, 1.1, channels)
        out.append(norm)
    return out


def _data(shape, seed=0):
    kx, kw = jax.random.split(jax.random.key(seed))
    return 3.0 * jax.random.normal(kx, shape) + 1.0, jax.random.normal(kw, shape)


@pytest.mark.parametrize("shape", [(4, 6, 6, 5), (3, 7, 7, 16), (16, 3), (2, 3, 4, 5, 6)])
def test_forward_and_running_statistics_are_flaxs_and_the_gradient_its_autodiff(shape):
    x, w = _data(shape)
    results = []
    for norm in _pair(shape[-1]):
        def loss(norm, x):
            return jnp.sum(w * jax.nn.relu(norm(x)))  # a ReLU after it, as in the networks

        y = norm(x)
        value, (g_norm, g_x) = jax.jit(nnx.value_and_grad(loss, argnums=(0, 1)))(norm, x)
        results.append((y, norm.mean[...], norm.var[...], value, g_x, g_norm.scale[...], g_norm.bias[...]))
    (y0, m0, v0, l0, gx0, gs0, gb0), (y1, m1, v1, l1, gx1, gs1, gb1) = results
    for ours, flax in ((y1, y0), (m1, m0), (v1, v0), (l1, l0)):
        np.testing.assert_array_equal(ours, flax)
    np.testing.assert_allclose(gx1, gx0, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(gx0))))
    np.testing.assert_allclose(gs1, gs0, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(gb1, gb0, rtol=1e-4, atol=1e-4)


def test_a_bfloat16_batch_norm_trains_as_flaxs():
    x, w = _data((4, 5, 5, 3))
    grads = []
    for cls in (nnx.BatchNorm, BatchNorm):
        norm = cls(3, momentum=0.9, epsilon=1e-5, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
        value, g = jax.jit(nnx.value_and_grad(lambda norm: jnp.sum(w * norm(x.astype(jnp.bfloat16)))))(norm)
        grads.append((value, g.scale[...], g.bias[...]))
    (l0, s0, b0), (l1, s1, b1) = grads
    assert l1 == l0 and s1.dtype == s0.dtype and b1.dtype == b0.dtype
    np.testing.assert_allclose(s1, s0, rtol=2e-2, atol=2e-2)
    np.testing.assert_allclose(b1, b0, rtol=2e-2, atol=2e-2)


def test_evaluation_uses_the_running_statistics_as_flax_does():
    x, _ = _data((4, 5, 5, 3))
    flax_norm, ours = _pair(3)
    flax_norm.eval()
    ours.eval()
    np.testing.assert_array_equal(ours(x), flax_norm(x))
    np.testing.assert_array_equal(ours.mean[...], jnp.linspace(-0.1, 0.1, 3))  # not updated


def _normalize_autodiff(x, scale, bias):
    mean, var = layers.batch_moments(x)
    return (x - mean) * (jax.lax.rsqrt(var + 1e-5) * scale) + bias


def test_the_gradient_inside_scan_checkpoint_and_vmap():
    x, w = _data((3, 4, 5, 5, 6), seed=1)  # 3 scan steps (or vmapped examples) of a (4, 5, 5, 6) batch
    scale, bias = jnp.linspace(0.5, 1.5, 6), jnp.linspace(-1.0, 1.0, 6)

    def scanned(normalize):
        def loss(x, scale, bias):
            def body(carry, xw):
                xi, wi = xw
                return carry + jnp.sum(wi * jnp.tanh(normalize(xi * carry, scale, bias))), None
            return jax.lax.scan(jax.checkpoint(body), jnp.float32(1.0), (x, w))[0]
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))

    def mapped(normalize):
        def loss(x, scale, bias):
            return jnp.sum(w * jax.vmap(lambda xi: normalize(xi, scale, bias))(x))
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))

    ours = lambda x, scale, bias: normalize_batch(x, scale, bias, 1e-5)  # noqa: E731
    for wrap in (scanned, mapped):
        for g, g_ref in zip(wrap(ours)(x, scale, bias), wrap(_normalize_autodiff)(x, scale, bias)):
            np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(g_ref))))


def test_a_training_step_is_the_same_with_flaxs_batch_norm(monkeypatch):
    from stepjax.config import command_config
    from stepjax.models import build_model, resnet

    config = command_config("cifar10_resnet:smoke", [])
    x = jax.random.normal(jax.random.key(0), (8, 32, 32, 3))
    labels = jnp.arange(8) % 10
    results = []
    for cls in (nnx.BatchNorm, BatchNorm):
        monkeypatch.setattr(layers, "BatchNorm", cls)
        resnet._initialiser.cache_clear()  # a model of the other class, not the cached one
        model = build_model(config)
        assert {type(m) for _, m in nnx.iter_modules(model) if isinstance(m, nnx.BatchNorm)} == {cls}

        def loss(model):
            return -jnp.mean(jax.nn.log_softmax(model(x))[jnp.arange(8), labels])

        value, grads = nnx.jit(nnx.value_and_grad(loss))(model)
        results.append((value, nnx.state(grads, nnx.Param), nnx.state(model, nnx.BatchStat)))
    resnet._initialiser.cache_clear()
    (l0, g0, s0), (l1, g1, s1) = results
    assert l1 == l0
    for a, b in zip(jax.tree.leaves(s1), jax.tree.leaves(s0)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * max(float(jnp.max(jnp.abs(b))), 1e-3))


@pytest.mark.parametrize("evaluation", [False, True])
def test_the_affine_map_is_the_batch_norm_and_updates_the_same_statistics(evaluation):
    x, w = _data((4, 6, 6, 5))
    _, ours = _pair(5)
    _, as_map = _pair(5)
    if evaluation:
        ours.eval()
        as_map.eval()

    def through_map(norm, x):
        scale, shift = norm.affine(x)
        return scale * x + shift

    y = ours(x)
    np.testing.assert_allclose(through_map(as_map, x), y, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(as_map.mean[...], ours.mean[...])
    np.testing.assert_array_equal(as_map.var[...], ours.var[...])
    grads = [nnx.grad(lambda norm, x, f=f: jnp.sum(w * jnp.tanh(f(norm, x))), argnums=1)(norm, x)
             for f, norm in ((lambda norm, x: norm(x), ours), (through_map, as_map))]
    np.testing.assert_allclose(grads[1], grads[0], rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(grads[0]))))
