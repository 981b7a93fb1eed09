"""Optional compiled kernels for the CPU backend: oneDNN convolutions through XLA's FFI
(`stepjax.kernels.onednn`) and a step-size controller's spatial moments in one pass
(`stepjax.kernels.moments`), one library that ``python -m stepjax.kernels.build`` builds (``make
setup`` runs it); and a lowering that spares XLA's CPU compiler a copy of every value `jax.checkpoint` stores
(`stepjax.kernels.lowering`). Nothing here imports the rest of stepjax."""

from stepjax.kernels.lowering import drop_exact_reduce_precision
from stepjax.kernels.moments import Moments, spatial_moments
from stepjax.kernels.onednn import conv_same, load, path_for, trace_settings

__all__ = ["Moments", "conv_same", "drop_exact_reduce_precision", "load", "path_for", "spatial_moments", "trace_settings"]
