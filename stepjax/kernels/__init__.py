"""Optional compiled kernels for the CPU backend: oneDNN convolutions through XLA's FFI
(`stepjax.kernels.onednn`; ``python -m stepjax.kernels.build`` builds them, ``make setup`` runs
it). Nothing here imports the rest of stepjax."""

from stepjax.kernels.onednn import conv_same, load, path_for

__all__ = ["conv_same", "load", "path_for"]
