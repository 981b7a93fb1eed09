"""A step-size controller's spatial moments in one pass (`stepjax.kernels.spatial_moments`, the CPU
extension) against the `jnp` reductions they replace, and both against the moments of the field
formed, in float64: values for the shapes the models use,
under jit, scan, checkpoint, vmap and a batch split over devices; kept for the backward pass of a
scanned stage; the reductions wherever the extension is not there or not wanted. One StepNet
training step the same either way: `tests/test_onednn.py`, beside the other training steps."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stepjax import kernels, parallel
from stepjax.kernels import moments, onednn

NOT_BUILT = kernels.load()
needs_extension = pytest.mark.skipif(NOT_BUILT is not None, reason=f"CPU extension unavailable: {NOT_BUILT}")

# (batch, height, width, channels): the stages of ResNet-164 at a small batch, odd sizes, one pixel
SHAPES = [(2, 32, 32, 16), (3, 8, 8, 64), (2, 4, 4, 256), (3, 5, 7, 3), (1, 1, 1, 5)]


@pytest.fixture
def extension_path(monkeypatch):
    monkeypatch.setenv("STEPJAX_CONV", "onednn")
    jax.clear_caches()  # the path is chosen when a function is traced


def operands(shape, lead=()):
    ky, kf = jax.random.split(jax.random.key(sum(shape)))
    y = jax.nn.relu(jax.random.normal(ky, (*lead, *shape)))
    return y, 0.3 + 2.0 * jax.random.normal(kf, (*lead, *shape))


def assert_moments_equal(ours, theirs):
    assert type(ours) is type(theirs) is moments.Moments
    for a, b in zip(ours, theirs, strict=True):
        assert a.shape == b.shape and a.dtype == jnp.float32
        np.testing.assert_allclose(a, b, rtol=2e-6, atol=2e-6 * float(jnp.max(jnp.abs(b))))


def transformed(fn, transform):
    """`fn(y, f)` under one transform, as one jitted function of `(y, f)` (stacked twice for scan)."""
    if transform == "checkpoint":
        fn = jax.checkpoint(fn)
    if transform == "scan":
        inner = fn
        fn = lambda ys, fs: jax.lax.scan(lambda c, yf: (c, inner(*yf)), 0.0, (ys, fs))[1]  # noqa: E731
    if transform == "vmap":
        fn = jax.vmap(fn)
    return jax.jit(fn)


@needs_extension
@pytest.mark.parametrize("transform", ["jit", "scan", "checkpoint", "vmap"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_one_pass_equals_the_reductions(shape, transform, extension_path):
    y, f = operands(shape, lead=(2,) if transform in ("scan", "vmap") else ())
    ours = transformed(kernels.spatial_moments, transform)
    assert moments.TARGET in ours.lower(y, f).compile().as_text()
    assert_moments_equal(ours(y, f), transformed(moments.reduced_moments, transform)(y, f))


def formed_in_float64(y, z, scale, shift):
    """The `Moments` of ``f = scale * z + shift`` formed first, from their definitions, in float64."""
    y, z, scale, shift = (np.asarray(v, np.float64) for v in (y, z, scale, shift))
    f = scale[..., None, None, :] * z + shift[..., None, None, :]
    sign = np.where(f >= 0, 1.0, -1.0)
    mean = lambda v: v.mean(axis=(-3, -2))  # noqa: E731
    return moments.Moments(f=mean(f), abs_f=mean(np.abs(f)), var_f=f.var(axis=(-3, -2)), y=mean(y), abs_y=mean(np.abs(y)),
                           sign_f=mean(sign), sign_f_z=mean(sign * z), z=mean(z), var_z=z.var(axis=(-3, -2)))


def each_path(monkeypatch):
    """Run the body once on the extension's path (where built) and once on the reductions'."""
    for path in (["onednn"] if NOT_BUILT is None else []) + ["xla"]:
        monkeypatch.setenv("STEPJAX_CONV", path)
        jax.clear_caches()
        yield path


@pytest.mark.parametrize("transform", ["jit", "vmap"])
def test_the_moments_of_a_field_folded_into_its_step_are_those_of_the_field_formed(transform, monkeypatch):
    """``f = scale * z + shift`` with a scale and shift per example and channel, on the extension's
    path (where built) and on the reductions': the moments are those of the field formed first,
    taken from their definitions in float64."""
    shape = (3, 6, 5, 16)
    y, z = operands(shape, lead=(2,) if transform == "vmap" else ())
    ks, kt = jax.random.split(jax.random.key(3))
    scale, shift = (jax.random.normal(k, (*y.shape[:-4], 3, 16)) for k in (ks, kt))
    want = formed_in_float64(y, z, scale, shift)
    for path in each_path(monkeypatch):
        fn = jax.jit(kernels.spatial_moments) if transform == "jit" else jax.jit(jax.vmap(kernels.spatial_moments))
        assert (moments.TARGET in fn.lower(y, z, scale, shift).compile().as_text()) == (path == "onednn")
        assert_moments_equal(fn(y, z, scale, shift), moments.Moments(*(jnp.asarray(v, jnp.float32) for v in want)))


@pytest.mark.parametrize("offset", [0.0, 30.0, 3000.0])
def test_the_variances_keep_their_digits_far_from_zero(offset, monkeypatch):
    """A channel whose values sit far from 0 against their spread (here ``offset / std`` up to
    1500): the variances, taken about the example's first pixel, keep float32 accuracy (relative
    1e-5); ``mean(z^2) - mean(z)^2`` about 0 would lose ``1e-7 (offset / std)^2``, everything at
    1500 (fails so, checked)."""
    y, z = operands((2, 8, 8, 16))
    z = offset + z
    scale, shift = jnp.full((2, 16), 0.5), jnp.full((2, 16), -0.5 * offset)
    want = formed_in_float64(y, z, scale, shift)
    for _ in each_path(monkeypatch):
        got = jax.jit(kernels.spatial_moments)(y, z, scale, shift)
        for name in ("var_z", "var_f"):
            np.testing.assert_allclose(getattr(got, name), getattr(want, name), rtol=1e-5)


def test_a_library_built_from_other_sources_is_not_loaded(monkeypatch, tmp_path):
    """A library whose handlers take other operands (built before the moments took a scale and
    a shift) would fail inside a compiled step: it is refused when it loads, with the fix."""
    class OldLibrary:  # no StepjaxAbiVersion: the interface before it
        pass

    monkeypatch.setattr(onednn, "LIBRARY", tmp_path / "_onednn_conv.so")
    onednn.LIBRARY.write_bytes(b"")
    monkeypatch.setattr(onednn.ctypes.cdll, "LoadLibrary", lambda path: OldLibrary())
    reason = onednn.load.__wrapped__()
    assert "built from other sources" in reason and "make setup" in reason


@needs_extension
def test_vmap_of_one_operand_joins_the_mapped_axis_to_the_batch(extension_path):
    y, _ = operands((2, 4, 4, 8))
    _, fs = operands((2, 4, 4, 8), lead=(3,))
    ours = jax.jit(jax.vmap(kernels.spatial_moments, in_axes=(None, 0)))(y, fs)
    theirs = jax.vmap(moments.reduced_moments, in_axes=(None, 0))(y, fs)
    assert_moments_equal(ours, theirs)


@needs_extension
def test_a_split_batch_stays_split(extension_path):
    """Each device takes the moments of its own examples: nothing is gathered or summed."""
    mesh = parallel.data_mesh(2)
    y, f = (jax.device_put(v, parallel.batch_sharded(mesh)) for v in operands((4, 8, 8, 16)))
    fn = jax.jit(kernels.spatial_moments)
    hlo = fn.lower(y, f).compile().as_text()
    assert moments.TARGET in hlo and "all-gather" not in hlo and "all-reduce" not in hlo
    ours = fn(y, f)
    assert all(m.sharding.spec == parallel.batch_sharded(mesh).spec for m in ours)
    assert_moments_equal(ours, moments.reduced_moments(*operands((4, 8, 8, 16))))


@needs_extension
def test_the_moments_are_kept_for_the_backward_pass(extension_path):
    """Under the checkpoint of a scanned stage (saved names only) StepNet's features store their
    moments, so the backward pass does not read `y` and `f` again to redo them: the program of the
    loss and its gradient calls the one pass once, in the forward loop (twice without the tags
    of `stepjax.layers.spatial_moments`, checked by removing them)."""
    from stepjax.controllers.stepnet import step_features
    from stepjax.ode.euler import SAVED

    def loss(y, f):
        def body(c, scale):  # an Euler-like step: the state changes, the field with it
            out = sum(jnp.sum(jnp.sin(m)) for m in step_features(c, scale * f))
            return c + scale * f, out
        body = jax.checkpoint(body, policy=jax.checkpoint_policies.save_only_these_names(SAVED))
        return jnp.sum(jax.lax.scan(body, y, jnp.array([1.0, 0.5, 0.25]))[1])

    y, f = operands((2, 4, 4, 8))
    hlo = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(y, f).compile().as_text()
    assert hlo.count(f'custom_call_target="{moments.TARGET}"') == 1


def test_the_reductions_where_the_extension_is_not_wanted(monkeypatch):
    monkeypatch.setenv("STEPJAX_CONV", "xla")
    jax.clear_caches()
    y, f = operands((2, 4, 4, 8))
    assert moments.TARGET not in jax.jit(kernels.spatial_moments).lower(y, f).compile().as_text()
    assert_moments_equal(kernels.spatial_moments(y, f), moments.reduced_moments(y, f))


def test_the_reductions_without_the_extension(monkeypatch, tmp_path):
    monkeypatch.setattr(onednn, "LIBRARY", tmp_path / "_onednn_conv.so")
    reason = onednn.load.__wrapped__()
    monkeypatch.setattr(onednn, "load", lambda: reason)
    monkeypatch.delenv("STEPJAX_CONV", raising=False)
    jax.clear_caches()
    y, f = operands((2, 4, 4, 8))
    assert moments.TARGET not in jax.jit(kernels.spatial_moments).lower(y, f).compile().as_text()
