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

LIBRARY = Path(__file__).resolve().with_name("_onednn_conv.so")
_SYMBOLS = {"forward": "StepjaxConvForward", "input_grad": "StepjaxConvInputGrad", "kernel_grad": "StepjaxConvKernelGrad"}
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
    for name, symbol in _SYMBOLS.items():
        jax.ffi.register_ffi_target(f"stepjax_onednn_conv_{name}", jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
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


@functools.cache
def _notice(path: str, why: str) -> str:
    where = "oneDNN through XLA's FFI" if path == "onednn" else "XLA's own convolution"
    _log.info("stepjax: convolutions run in %s (%s).", where, why)
    return path


def threads() -> int:
    """OpenMP threads per oneDNN call: ``$STEPJAX_ONEDNN_THREADS``, else this process's cores
    divided among its CPU devices (each device runs its own convolutions at the same time)."""
    if os.environ.get("STEPJAX_ONEDNN_THREADS"):
        return int(os.environ["STEPJAX_ONEDNN_THREADS"])
    return max(1, len(os.sched_getaffinity(0)) // jax.local_device_count("cpu"))


def _call(name, a, b, stride, like):
    call = jax.ffi.ffi_call(f"stepjax_onednn_conv_{name}", jax.ShapeDtypeStruct(like.shape, like.dtype),
                            vmap_method="sequential")
    return call(a, b, stride=np.int64(stride), threads=np.int64(threads()))


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
