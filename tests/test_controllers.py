"""Every attention module as a step-size controller: shapes, ranges, gradients, jit, state."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from stepjax.controllers import CONTROLLERS, eca_kernel_size, make_controller, step_features
from stepjax.ode import ChannelAffine

B, H, W, C = 3, 4, 5, 32
Y0 = jax.nn.relu(jax.random.normal(jax.random.key(0), (B, H, W, C)))
F0 = jax.random.normal(jax.random.key(1), (B, H, W, C))
# the broadcast shape each controller's step is expected to have
STEP_SHAPES = {
    "constant": (), "learned": (), "se": (B, 1, 1, C), "eca": (B, 1, 1, C), "srm": (B, 1, 1, C),
    "dia": (B, 1, 1, C), "stepnet": (B, 1, 1, C), "cbam": (B, H, W, C), "channel_step": (B, 1, 1, C),
}


def step_of(controller, y0=Y0, f0=F0, state=None):
    state = controller.init(y0) if state is None else state
    return controller.adapt_step_size(jnp.asarray(0), y0, f0, state)


def test_every_registered_controller_has_an_expected_shape():
    assert set(STEP_SHAPES) == set(CONTROLLERS)


@pytest.mark.parametrize("name", sorted(CONTROLLERS))
def test_shape_range_and_broadcast(name):
    h, _ = step_of(make_controller(name, C, rngs=nnx.Rngs(0)))
    assert jnp.shape(h) == STEP_SHAPES[name]
    assert jnp.broadcast_shapes(jnp.shape(h), F0.shape) == F0.shape
    assert bool(jnp.all(jnp.isfinite(h)))
    if name in ("constant", "learned"):
        np.testing.assert_allclose(h, 1.0)
    else:  # gated controllers choose steps in (0, 1), not all equal (SRM and channel_step start at 0.5 by design)
        assert bool(jnp.all((h > 0) & (h < 1)))
        if name in ("srm", "channel_step"):
            return
        assert float(jnp.std(jnp.broadcast_to(h, F0.shape))) > 0


@pytest.mark.parametrize("name", sorted(set(CONTROLLERS) - {"constant"}))
def test_finite_nonzero_gradients(name):
    controller = make_controller(name, C, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(controller, nnx.Param, ...)

    def loss(params, f0, rest):
        h, _ = step_of(nnx.merge(graphdef, params, rest, copy=True), f0=f0)
        return jnp.sum(jnp.broadcast_to(h, F0.shape) * f0)

    g_params, g_f = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, F0, rest)
    leaves = jax.tree.leaves(g_params)
    assert leaves and all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
    assert sum(float(jnp.abs(g).sum()) for g in leaves) > 0
    assert bool(jnp.all(jnp.isfinite(g_f)))


@pytest.mark.parametrize("name", sorted(CONTROLLERS))
def test_same_values_with_and_without_jit(name):
    controller = make_controller(name, C, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(controller)
    eager = step_of(controller)[0]
    jitted = jax.jit(lambda s: step_of(nnx.merge(graphdef, s))[0])(state)
    np.testing.assert_allclose(eager, jitted, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name,options", [("dia", {}), ("stepnet", {"history": True})])
def test_stateful_controllers_carry_state(name, options):
    controller = make_controller(name, C, rngs=nnx.Rngs(0), **options)
    if name == "stepnet":  # untrained StepNet ignores its history by construction (it starts as SE)
        controller.feature_mix[...] = jax.random.normal(jax.random.key(2), controller.feature_mix.shape)
    start = controller.init(Y0)
    _, carried = step_of(controller, state=start)
    changed = [not np.allclose(a, b) for a, b in zip(jax.tree.leaves(start), jax.tree.leaves(carried))]
    assert any(changed)
    f1 = F0 * 2.0 + 0.3
    h_carried, _ = step_of(controller, f0=f1, state=carried)
    h_fresh, _ = step_of(controller, f0=f1, state=start)
    assert not np.allclose(h_carried, h_fresh)


def test_stepnet_without_history_is_stateless_and_starts_as_se():
    stepnet = make_controller("stepnet", C, rngs=nnx.Rngs(0), history=False)
    se = make_controller("se", C, rngs=nnx.Rngs(0))
    assert stepnet.init(Y0) == ()
    np.testing.assert_allclose(step_of(stepnet)[0], step_of(se)[0], rtol=1e-6)


def test_stepnet_features_by_hand():
    y = jnp.ones((1, 2, 2, 1)) * 2.0
    f = jnp.array([1.0, -1.0, 3.0, -3.0]).reshape(1, 2, 2, 1)
    mean_f, mean_y, relative, spread = step_features(y, f, eps=0.0)
    np.testing.assert_allclose([mean_f[0, 0], mean_y[0, 0], relative[0, 0], spread[0, 0]],
                               [0.0, 2.0, 0.5, np.sqrt(5.0)], rtol=1e-6)  # r = 2 / 2 = 1 -> r / (1 + r)


def _features_by_autodiff(y, f, eps):
    mean_f = f.mean(axis=(1, 2))
    abs_f = jnp.abs(f).mean(axis=(1, 2))
    relative = abs_f / (abs_f + jnp.abs(y).mean(axis=(1, 2)) + eps)
    return mean_f, y.mean(axis=(1, 2)), relative, jnp.sqrt(f.var(axis=(1, 2)) + eps)


@pytest.mark.parametrize("nonnegative_state", [False, True])
@pytest.mark.parametrize("eps,shift", [(1e-5, 0.0), (0.0, 0.0), (1e-5, 3.0)])
def test_stepnet_features_hand_written_gradient_equals_autodiff(eps, shift, nonnegative_state):
    # the oracle is autodiff of the textbook formula in float64; y has exact zeros (after a ReLU),
    # where |y|'s slope is 1, and is known non-negative or not; f shifted far from 0 (10 spreads)
    # checks the spread and its gradient, to float32 rounding (the variance is taken about a pivot)
    ky, kf, kw = jax.random.split(jax.random.key(2), 3)
    y = jax.nn.relu(jax.random.normal(ky, (3, 5, 4, C)))
    f = shift + 0.3 * jax.random.normal(kf, (3, 5, 4, C))
    weights = [jax.random.normal(k, (3, C)) for k in jax.random.split(kw, 4)]

    def loss(features, eps, weights):
        return lambda y, f: sum(jnp.sum(w * x) for w, x in zip(weights, features(y, f, eps)))

    features = functools.partial(step_features, nonnegative_state=nonnegative_state)
    got = jax.jit(jax.grad(loss(features, eps, weights), argnums=(0, 1)))(y, f)
    with jax.enable_x64(True):
        y64, f64 = (np.asarray(v, np.float64) for v in (y, f))
        weights64 = [np.asarray(w, np.float64) for w in weights]
        want = jax.grad(loss(_features_by_autodiff, np.float64(eps), weights64), argnums=(0, 1))(y64, f64)
        want_features = _features_by_autodiff(y64, f64, np.float64(eps))
    assert float(jnp.abs(got[0]).max()) > 1e-3 and float(jnp.abs(got[1]).max()) > 1e-3
    for g, w in zip(got, want):  # an element is a sum of terms up to the largest element's size
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6 * float(np.abs(w).max()))
    for g, w in zip(step_features(y, f, eps), want_features):
        np.testing.assert_allclose(g, w, rtol=2e-6, atol=1e-7 * (1 + shift))


@pytest.mark.parametrize("offset", [2.0, 30.0])
def test_stepnet_features_of_a_folded_field_are_those_of_the_field_formed(offset):
    """Given as ``scale * z + shift`` (`ChannelAffine`, per channel as a BatchNorm folded into its
    step gives it), the features and their gradients, also into the map, are those of ``f`` formed
    first; the oracle is the features of that array and autodiff of the map. The gradient into the
    scale takes ``z``'s spatial variance from its moments, about a pivot: float32 rounding, also
    where ``z``'s mean is 20 spreads from 0."""
    ky, kz, kw = jax.random.split(jax.random.key(7), 3)
    y = jax.nn.relu(jax.random.normal(ky, (3, 5, 4, C)))
    z = offset + 1.5 * jax.random.normal(kz, (3, 5, 4, C))
    scale, shift = jnp.linspace(-1.2, 0.8, C), jnp.linspace(0.3, -0.4, C)
    weights = [jax.random.normal(k, (3, C)) for k in jax.random.split(kw, 4)]

    def loss(fold):
        def value(y, z, scale, shift):
            f0 = ChannelAffine(z, scale, shift) if fold else scale * z + shift
            return sum(jnp.sum(w * x) for w, x in zip(weights, step_features(y, f0)))
        return jax.jit(jax.value_and_grad(value, argnums=(0, 1, 2, 3)))

    (folded, g_folded), (formed, g_formed) = (loss(fold)(y, z, scale, shift) for fold in (True, False))
    np.testing.assert_allclose(folded, formed, rtol=1e-5)
    for a, b in zip(g_folded, g_formed, strict=True):
        assert float(jnp.abs(b).max()) > 1e-3
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(jnp.abs(b).max()))


@pytest.mark.parametrize("sd", [1.0, 0.3, 0.03, 0.003])
def test_stepnet_spread_from_moments_against_float64(sd):
    # the spread is sqrt(var + eps) with the variance from moments about a pivot (f at the first
    # pixel), in float32: with the mean 3 (mean / std up to 1000) it keeps float32 accuracy, where
    # GAP(f^2) - GAP(f)^2 lost 1e-7 (mean / std)^2 relative; the result is never NaN
    f = 3.0 + sd * jax.random.normal(jax.random.key(5), (4, 8, 8, C))
    spread = np.asarray(step_features(jnp.ones_like(f), f, eps=1e-5)[3], np.float64)
    f64 = np.asarray(f, np.float64)
    want = np.sqrt(f64.var(axis=(1, 2)) + 1e-5)
    np.testing.assert_allclose(spread, want, rtol=1e-5)
    flat = jnp.full((2, 8, 8, C), 3.1) * jnp.linspace(1.0, 1.3, C)  # no spread: moments may cancel below 0
    np.testing.assert_allclose(step_features(flat, flat, eps=1e-5)[3], np.sqrt(1e-5), rtol=1e-3)


def test_stepnet_relative_increment_is_bounded_on_a_dead_channel():
    # a channel zeroed by a ReLU (GAP(|y|) = 0) must not give a huge feature or a huge gradient
    y = jnp.ones((4, 3, 3, C)).at[..., 0].set(0.0)
    f = 0.01 * jax.random.normal(jax.random.key(1), (4, 3, 3, C))
    relative = step_features(y, f)[2]
    assert jnp.all((relative >= 0) & (relative <= 1)) and relative[:, 0].min() > 0.99
    stepnet = make_controller("stepnet", C, rngs=nnx.Rngs(0), history=False)
    graphdef, params = nnx.split(stepnet)

    def mean_step(params):
        h, _ = nnx.merge(graphdef, params).adapt_step_size(0.0, y, f, ())
        return h.mean()

    grad_mix = jax.grad(mean_step)(params)["feature_mix"][...]
    assert jnp.all(jnp.isfinite(grad_mix)) and float(jnp.abs(grad_mix).max()) < 1.0


def test_eca_kernel_sizes():
    assert [eca_kernel_size(c) for c in (64, 128, 256, 512)] == [3, 5, 5, 5]


def test_unknown_controller_and_bad_option():
    with pytest.raises(ValueError, match="Unknown controller 'foo'.*'se'"):
        make_controller("foo", C, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="Bad options"):
        make_controller("se", C, rngs=nnx.Rngs(0), nonsense=3)


def test_channel_step_is_a_trained_step_that_ignores_the_input():
    controller = make_controller("channel_step", C, rngs=nnx.Rngs(0), init_value=0.25)
    np.testing.assert_allclose(step_of(controller)[0], 0.25, rtol=1e-6)
    controller.logit[...] = jnp.arange(C, dtype=jnp.float32) - C / 2
    h, _ = step_of(controller)
    other, _ = step_of(controller, y0=2.0 * Y0 + 1.0, f0=-F0)
    np.testing.assert_array_equal(h, other)  # the same step for every image and state
    np.testing.assert_allclose(h[0, 0, 0], jax.nn.sigmoid(controller.logit[...]), rtol=1e-6)
    assert float(jnp.std(h[0, 0, 0])) > 0 and bool(jnp.all(h == h[:1]))
    with pytest.raises(ValueError, match="lies in \\(0, 1\\)"):
        make_controller("channel_step", C, rngs=nnx.Rngs(0), init_value=1.0)
