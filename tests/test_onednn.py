"""The oneDNN convolutions (`stepjax.kernels`) against XLA's: values and gradients for every shape
class of the models, under jit, scan, checkpoint and vmap; one ResNet-164 training step on both
paths; and the XLA path wherever the extension is not there or not wanted. Also the CPU lowering
of `stepjax.kernels.lowering`: a rounding that keeps every bit is no instruction, others still round."""

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stepjax import data, kernels, parallel
from stepjax.config import apply_overrides, load_experiment
from stepjax.kernels import moments, onednn
from stepjax.layers import conv2d
from stepjax.models import build_model
from stepjax.train import init_state, make_optimizer, make_train_step
from stepjax.train.step import learning_rate_schedule

NOT_BUILT = kernels.load()
needs_extension = pytest.mark.skipif(
    NOT_BUILT is not None, reason=f"oneDNN extension unavailable: {NOT_BUILT}")

# (batch, height, in channels, out channels, kernel, stride): the convolutions of the models
SHAPES = {
    "stem 3x3": (2, 8, 3, 4, 3, 1),
    "bottleneck 1x1 in": (2, 8, 16, 4, 1, 1),
    "bottleneck 3x3": (2, 8, 4, 4, 3, 1),
    "bottleneck 3x3 stride 2": (2, 8, 4, 4, 3, 2),
    "bottleneck 1x1 out": (2, 8, 4, 16, 1, 1),
    "1x1 matrix product, odd sizes": (3, 5, 7, 3, 1, 1),
    "projection 1x1 stride 2": (2, 8, 16, 32, 1, 2),
    "odd map stride 2": (2, 7, 4, 4, 3, 2),
    "cbam 7x7": (2, 8, 2, 1, 7, 1),
    "imagenet stem 7x7 stride 2": (2, 9, 3, 8, 7, 2),
}


def xla_conv(x, w, stride):
    p = w.shape[0] // 2
    return jax.lax.conv_general_dilated(x, w, (stride, stride), ((p, p), (p, p)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"), precision="highest")


def operands(shape, lead=()):
    b, h, c, o, k, s = shape
    kx, kw = jax.random.split(jax.random.key(sum(shape)))
    return jax.random.normal(kx, (*lead, b, h, h, c)), jax.random.normal(kw, (*lead, k, k, c, o)) / k


def value_and_grads(conv, stride, transform):
    """``(sum(conv(x, w) * dy), (dx, dw))`` of a conv under one transform: its cotangent `dy` is
    fixed, so the gradients are exactly the input gradient and the kernel gradient of `dy`."""

    def loss(x, w):
        y = conv(x, w, stride)
        dy = jnp.cos(jnp.arange(y.size, dtype=y.dtype).reshape(y.shape))
        return jnp.sum(y * dy)

    if transform == "checkpoint":
        loss = jax.checkpoint(loss)
    if transform == "scan":  # the conv inside a scanned body, over two kernels
        def loss(x, ws, one=loss):
            return jax.lax.scan(lambda c, w: (c + one(x, w), None), 0.0, ws)[0]
    f = jax.value_and_grad(loss, argnums=(0, 1))
    if transform == "vmap":
        f = jax.vmap(f)
    return jax.jit(f)


@needs_extension
@pytest.mark.parametrize("transform", ["jit", "scan", "checkpoint", "vmap"])
@pytest.mark.parametrize("name", list(SHAPES))
def test_onednn_conv_equals_xla(name, transform):
    shape = SHAPES[name]
    x, w = operands(shape, lead=(2,) if transform == "vmap" else ())
    if transform == "scan":
        w = jnp.stack([w, -0.5 * w])
    ours = value_and_grads(onednn.conv_same, shape[-1], transform)
    theirs = value_and_grads(xla_conv, shape[-1], transform)
    assert "stepjax_onednn_conv_kernel_grad" in ours.lower(x, w).compile().as_text()
    for a, b in zip(jax.tree.leaves(ours(x, w)), jax.tree.leaves(theirs(x, w)), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(b))))


@needs_extension
def test_forward_shape_and_values():
    x, w = operands(SHAPES["bottleneck 3x3 stride 2"])
    y = jax.jit(onednn.conv_same, static_argnums=2)(x, w, 2)
    assert y.shape == (2, 4, 4, 4)
    np.testing.assert_allclose(y, xla_conv(x, w, 2), rtol=1e-5, atol=1e-5)


def _threads_of_calls(mesh, monkeypatch):
    """The ``threads`` attribute of each oneDNN call in a compiled value-and-gradient of a conv whose
    batch is split over `mesh`."""
    monkeypatch.delenv("STEPJAX_ONEDNN_THREADS", raising=False)
    x, w = operands(SHAPES["bottleneck 3x3"])
    x = jax.device_put(x, parallel.batch_sharded(mesh))
    w = jax.device_put(w, parallel.replicated(mesh))
    loss = jax.value_and_grad(lambda x, w: jnp.sum(onednn.conv_same(x, w, 1) ** 2), argnums=(0, 1))
    hlo = jax.jit(loss).lower(x, w).compile().as_text()
    calls = [line for line in hlo.splitlines() if "stepjax_onednn_conv" in line]
    assert len(calls) >= 3, hlo  # forward, input gradient, kernel gradient
    return {int(n) for line in calls for n in re.findall(r"threads\W+(\d+)", line)}


@needs_extension
def test_onednn_threads_divide_the_cores_among_the_programs_devices(monkeypatch):
    """A program on one device gives each call every core of the process, though the process has
    more devices (the deep protocol trains on one of them); one split over two devices, half each."""
    cores = len(os.sched_getaffinity(0))
    assert jax.local_device_count() == 4  # tests/conftest.py
    assert _threads_of_calls(parallel.data_mesh(1), monkeypatch) == {cores}
    assert _threads_of_calls(parallel.data_mesh(2), monkeypatch) == {max(1, cores // 2)}
    monkeypatch.setenv("STEPJAX_ONEDNN_THREADS", "3")
    assert onednn.threads(1) == onednn.threads(2) == 3


RESNET164 = ("cifar10_resnet:smoke", ["model.depths=(18, 18, 18)", "model.widths=(16, 32, 64)", "model.stem_width=16"])


def _one_step(devices, monkeypatch, path, network=RESNET164):
    """Loss, updated parameters and compiled program of one training step of `network` (an
    experiment and its overrides; default ResNet-164) at batch 8 on 32x32 synthetic images, on
    `path`, the batch sharded over `devices` CPU devices."""
    monkeypatch.setenv("STEPJAX_CONV", path)
    exp, overrides = network
    config = apply_overrides(load_experiment(exp), [*overrides, "data.image_size=32", "train.global_batch=8"])
    mesh = parallel.data_mesh(devices)
    schedule = learning_rate_schedule(config.optim, 10, 100)
    tx = make_optimizer(config.optim, schedule)
    graphdef, state = init_state(build_model(config), tx)
    info = data.dataset_info(config.data)
    images = jax.random.randint(jax.random.key(1), (8, 32, 32, 3), 0, 256).astype(jnp.uint8)
    batch = parallel.global_batch({"image": np.asarray(images), "label": np.arange(8) % 10}, mesh)
    step = make_train_step(graphdef, tx, schedule, config, info, mesh)
    hlo = step.lower(state, batch).compile().as_text()
    assert ("stepjax_onednn_conv" in hlo) == (path == "onednn")
    assert "reduce-precision(" not in hlo  # the scan's stored values are not copied (kernels.lowering)
    state, metrics = step(state, batch)
    return float(metrics["loss"]), jax.tree.map(np.asarray, state.params), hlo


@needs_extension
def test_resnet164_step_same_on_both_paths(monkeypatch):
    """One step of the full-depth network from its initialisation. Its early gradients are chaotic
    in float32 (XLA on one device and on two, which differ only in the order of reductions, already
    disagree by ~10 % on the stem's update), so the oneDNN step (batch split over two devices) must
    be as close to XLA's as XLA's two orders are to each other, leaf by leaf; the loss to 1e-4."""
    loss_1, params_1, _ = _one_step(1, monkeypatch, "xla")
    loss_2, params_2, _ = _one_step(2, monkeypatch, "xla")
    loss_dnn, params_dnn, _ = _one_step(2, monkeypatch, "onednn")
    assert loss_dnn == pytest.approx(loss_1, rel=1e-4)
    for a, b, c in zip(jax.tree.leaves(params_dnn), jax.tree.leaves(params_1), jax.tree.leaves(params_2), strict=True):
        noise = np.linalg.norm(c - b)
        assert np.linalg.norm(a - b) <= 3 * noise + 1e-6 * np.linalg.norm(b)


@needs_extension
def test_a_stepnet_training_step_is_the_same_with_the_one_pass_moments(monkeypatch):
    """A ResNet-20 with StepNet, the convolutions in oneDNN either way: its spatial moments in one
    pass (`stepjax.kernels.spatial_moments`) or as the five reductions."""
    stepnet = ("cifar10_stepnet:smoke", ["model.depths=(3, 3, 3)"])
    loss_ours, params_ours, hlo_ours = _one_step(2, monkeypatch, "onednn", stepnet)
    monkeypatch.setattr(kernels, "spatial_moments", moments.reduced_moments)
    loss_theirs, params_theirs, hlo_theirs = _one_step(2, monkeypatch, "onednn", stepnet)
    assert moments.TARGET in hlo_ours and moments.TARGET not in hlo_theirs
    assert loss_ours == pytest.approx(loss_theirs, rel=1e-6)
    for a, b in zip(jax.tree.leaves(params_ours), jax.tree.leaves(params_theirs), strict=True):
        assert np.linalg.norm(a - b) <= 1e-5 * np.linalg.norm(b) + 1e-7


def _lowered(x, w):
    jax.clear_caches()  # the path is chosen when conv2d is traced; the tests change it
    return jax.jit(conv2d, static_argnums=2).lower(x, w, 1).compile().as_text()


def test_xla_path_when_forced(monkeypatch):
    x, w = operands(SHAPES["bottleneck 3x3"])
    monkeypatch.setenv("STEPJAX_CONV", "xla")
    assert kernels.path_for(jnp.float32) == "xla"
    assert "stepjax_onednn" not in _lowered(x, w)
    np.testing.assert_allclose(jax.jit(conv2d)(x, w), xla_conv(x, w, 1), rtol=1e-5, atol=1e-5)


def test_xla_path_without_the_extension(monkeypatch, tmp_path):
    """A machine where the extension was not built: `load` names the reason, `conv2d` runs XLA's."""
    monkeypatch.setattr(onednn, "LIBRARY", tmp_path / "_onednn_conv.so")
    reason = onednn.load.__wrapped__()
    assert "is not built" in reason and "make setup" in reason
    monkeypatch.setattr(onednn, "load", lambda: reason)
    x, w = operands(SHAPES["stem 3x3"])
    assert kernels.path_for(jnp.float32) == "xla"
    assert "stepjax_onednn" not in _lowered(x, w)


@needs_extension
def test_onednn_path_is_the_cpu_default_for_float32_only(monkeypatch):
    monkeypatch.delenv("STEPJAX_CONV", raising=False)
    x, w = operands(SHAPES["stem 3x3"])
    assert kernels.path_for(jnp.float32) == "onednn" and "stepjax_onednn_conv_forward" in _lowered(x, w)
    assert kernels.path_for(jnp.bfloat16) == "xla"
    assert "stepjax_onednn" not in _lowered(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16))


def _rounded(x, exponent_bits, mantissa_bits):
    fn = jax.jit(lambda x: jax.lax.reduce_precision(x, exponent_bits, mantissa_bits))
    return np.asarray(fn(x)), "reduce-precision(" in fn.lower(x).compile().as_text()


def test_reduce_precision_to_its_own_format_is_no_instruction_on_the_cpu():
    """What `jax.checkpoint` puts on the values it stores: float32 to float32 is the operand, bit for
    bit (denormals, NaN and infinity included) and compiles to nothing; a real rounding (float32 to
    float16's format, bfloat16 to its own) still lowers to XLA's reduce-precision."""
    kernels.drop_exact_reduce_precision()
    x = np.array([1.0000001, 3e-40, np.nan, -np.inf, 65519.0, 1e5], np.float32)
    same, compiled = _rounded(jnp.asarray(x), 8, 23)
    assert same.view(np.uint32).tolist() == x.view(np.uint32).tolist() and not compiled
    half, compiled = _rounded(jnp.asarray(x), 5, 10)
    assert compiled and half[1] == 0 and half[4] == 65504 and half[5] == np.inf
    assert _rounded(jnp.asarray(x, jnp.bfloat16), 8, 7)[1]
