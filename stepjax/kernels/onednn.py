"""NHWC convolutions from oneDNN, called through XLA's FFI on the CPU backend.

The C++ handlers (``csrc/onednn_conv.cc``, built by ``python -m stepjax.kernels.build`` into
``_onednn_conv.so`` beside this file) compute the forward pass, the input gradient and the
kernel gradient of a bias-free NHWC/HWIO float32 convolution with padding ``k // 2``. `conv_same`
ties them together with `jax.custom_vjp`, so `jax.grad` runs oneDNN's gradient kernels; it works
under `jit`, `lax.scan`, `jax.checkpoint` and `vmap` (a loop over the mapped axis).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_batching import custom_vmap
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

LIBRARY = Path(__file__).resolve().with_name("_onednn_conv.so")
# the library's XLA FFI targets (registered for the CPU by `load`) and their C symbols
TARGETS = {"stepjax_onednn_conv_forward": "StepjaxConvForward", "stepjax_onednn_conv_input_grad": "StepjaxConvInputGrad",
           "stepjax_onednn_conv_kernel_grad": "StepjaxConvKernelGrad", "stepjax_spatial_moments": "StepjaxSpatialMoments"}
# the interface of the library's handlers (`StepjaxAbiVersion` in csrc/spatial_moments.cc)
ABI_VERSION = 4
_log = logging.getLogger("stepjax")


@functools.cache
def load() -> str | None:
    """Load the extension and register its handlers with XLA (once).

    **Returns:**

    None when the handlers are registered, else the reason they are not (one line).
    """
    if not LIBRARY.exists():
        return f"{LIBRARY.name} is not built (make setup builds it; python -m stepjax.kernels.build says why not)"
    try:
        lib = ctypes.cdll.LoadLibrary(str(LIBRARY))
    except OSError as e:
        return f"{LIBRARY.name} does not load ({e}); rebuild it with python -m stepjax.kernels.build"
    built = lib.StepjaxAbiVersion() if hasattr(lib, "StepjaxAbiVersion") else 1
    if built != ABI_VERSION:
        return (f"{LIBRARY.name} was built from other sources (interface {built}, this code needs {ABI_VERSION}); "
                "rebuild it with make setup")
    for target, symbol in TARGETS.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
    return None


def path_for(dtype) -> str:
    """Which convolution runs for operands of `dtype` on the default backend: ``"onednn"`` (float32
    on the CPU, extension built, ``$STEPJAX_CONV`` not ``xla``) or ``"xla"``. The first time a
    path is chosen for a reason, one line in the ``stepjax`` log says which and why."""
    if os.environ.get("STEPJAX_CONV", "").lower() == "xla":
        return _notice("xla", "STEPJAX_CONV=xla")
    if jax.default_backend() != "cpu":
        return _notice("xla", f"the {jax.default_backend()} backend")
    if jnp.dtype(dtype) != jnp.float32:
        return _notice("xla", f"{jnp.dtype(dtype).name} operands (the oneDNN path is float32)")
    reason = load()
    return _notice("xla", reason) if reason else _notice("onednn", str(LIBRARY))


def trace_settings(dtype) -> tuple:
    """What a convolution of `dtype` operands reads from this process when it is traced, beyond its
    operands and its program's mesh: its path and, on the oneDNN path, `threads` (whose inputs,
    besides the mesh, it stands for). Programs traced under equal settings and meshes are the same
    program."""
    path = path_for(dtype)
    return path, threads() if path == "onednn" else None


@functools.cache
def _notice(path: str, why: str) -> str:
    where = "oneDNN through XLA's FFI" if path == "onednn" else "XLA's own convolution"
    _log.info("convolutions run in %s (%s).", where, why)
    return path


def threads(devices: int | None = None) -> int:
    """OpenMP threads per oneDNN call: ``$STEPJAX_ONEDNN_THREADS``, else this process's cores
    divided among the CPU devices that run the program's convolutions at the same time: `devices`
    (the devices of its mesh), or, where the program does not say, all of the process's."""
    if os.environ.get("STEPJAX_ONEDNN_THREADS"):
        return int(os.environ["STEPJAX_ONEDNN_THREADS"])
    return max(1, len(os.sched_getaffinity(0)) // (devices or jax.local_device_count("cpu")))


def _ffi(name, a, b, shape, stride, devices=None):
    """One oneDNN call on whole operands: `name`'s result of `shape`, in a program that runs on
    `devices` CPU devices at once (None: not known here, see `threads`)."""
    call = jax.ffi.ffi_call(f"stepjax_onednn_conv_{name}", jax.ShapeDtypeStruct(shape, a.dtype),
                            vmap_method="sequential")
    return call(a, b, stride=np.int64(stride), threads=np.int64(threads(devices)))


def _partitioned(name, rule, reduce):
    """`name` as a `custom_partitioning` op for a batch split over devices (the ``data`` mesh of a
    sharded training step): each device convolves its own examples; the kernel gradient
    (`reduce`) is summed over the devices. Every other dimension stays whole (Shardy `rule`)."""

    @functools.partial(custom_partitioning, static_argnums=(2, 3))
    def kernel(a, b, shape, stride):  # lowered as it is only on one device (and in shard_map, unused here)
        return _ffi(name, a, b, shape, stride, devices=1)

    def partition(shape, stride, mesh, arg_shapes, result_shape):
        spec = arg_shapes[0].sharding.spec
        axis = spec[0] if len(spec) else None
        split, whole = NamedSharding(mesh, P(axis)), NamedSharding(mesh, P())

        def lower(a, b):
            if not reduce:
                return _ffi(name, a, b, (a.shape[0], *shape[1:]), stride, devices=mesh.size)
            out = _ffi(name, a, b, shape, stride, devices=mesh.size)
            return out if axis is None else jax.lax.psum(out, axis)

        return mesh, lower, whole if reduce else split, (split, split if reduce else whole)

    factors = dict.fromkeys(rule.replace(",", " ").replace("->", " ").split())
    kernel.def_partition(partition, sharding_rule=rule, reduction_factors=("b",) if reduce else (),
                         need_replication_factors=tuple(f for f in factors if f != "b"))
    return kernel


_KERNELS = {
    "forward": _partitioned("forward", "b h w c, k l c o -> b i j o", reduce=False),
    "input_grad": _partitioned("input_grad", "b i j o, k l c o -> b h w c", reduce=False),
    "kernel_grad": _partitioned("kernel_grad", "b h w c, b i j o -> k l c o", reduce=True),
}


def _call(name, a, b, stride, like):
    """`name` on `a` and `b`, a result shaped like `like`; under `vmap`, a loop of oneDNN calls."""

    @custom_vmap
    def call(a, b):
        return _KERNELS[name](a, b, tuple(like.shape), stride)

    @call.def_vmap
    def _loop(axis_size, in_batched, a, b):
        a, b = (v if batched else jnp.broadcast_to(v, (axis_size, *v.shape)) for v, batched in zip((a, b), in_batched))
        return jax.lax.map(lambda ab: _ffi(name, *ab, tuple(like.shape), stride), (a, b)), True

    return call(a, b)


def _output(x, w, stride):
    k, p = w.shape[0], w.shape[0] // 2
    ho, wo = ((n + 2 * p - k) // stride + 1 for n in x.shape[1:3])
    return jax.ShapeDtypeStruct((x.shape[0], ho, wo, w.shape[3]), x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv_same(x, w, stride):
    """oneDNN's convolution of `x` ``(B, H, W, C)`` with `w` ``(k, k, C, O)`` (odd ``k``), padding
    ``k // 2``, stride `stride`: what ``lax.conv_general_dilated(x, w, (stride, stride), ((p, p),
    (p, p)), dimension_numbers=("NHWC", "HWIO", "NHWC"))`` computes, in float32 on the CPU.
    Call `load` first (`path_for` does); `stride` is a Python int.

    **Returns:**

    ``(B, (H + 2p - k) // stride + 1, (W + 2p - k) // stride + 1, O)``.
    """
    return _call("forward", x, w, stride, _output(x, w, stride))


def _conv_same_fwd(x, w, stride):
    return conv_same(x, w, stride), (x, w)


def _conv_same_bwd(stride, residuals, dy):
    x, w = residuals
    dy = dy.astype(x.dtype)
    return _call("input_grad", dy, w, stride, x), _call("kernel_grad", x, dy, stride, w)


conv_same.defvjp(_conv_same_fwd, _conv_same_bwd)
