"""Build the CPU extension: ``python -m stepjax.kernels.build``.

Compiles ``csrc/onednn_conv.cc`` (the oneDNN convolutions) and ``csrc/spatial_moments.cc`` (a
step-size controller's spatial moments) into one library with the machine's C++ compiler (``$CXX``, default ``g++``)
against jax's XLA FFI headers (`jax.ffi.include_dir`) and oneDNN 3.2 from PyPI
(``onednn-devel-cpu-gomp`` headers, ``onednn-cpu-gomp`` library, pinned in requirements.txt;
pip puts both under the environment's data directory, ``<venv>/include`` and ``<venv>/lib``).
Writes ``stepjax/kernels/_onednn_conv.so``. Exits with status 1 and one line saying what is
missing when it cannot build; stepjax then runs its convolutions on the XLA path.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

from stepjax.kernels.onednn import LIBRARY

SOURCES = tuple(Path(__file__).resolve().parents[2] / "csrc" / name for name in ("onednn_conv.cc", "spatial_moments.cc"))


def compile_command(prefix: str | None = None, cxx: str | None = None) -> list[str]:
    """The compiler command line that builds `LIBRARY` from `SOURCES`.

    **Arguments:**

    - `prefix`: where pip put oneDNN's ``include/`` and ``lib/`` (default: this environment's
      data directory); `cxx`: the compiler (default ``$CXX`` or ``g++``).

    **Returns:**

    The argument list; raises `FileNotFoundError` naming what is missing.
    """
    import jax.ffi

    prefix = Path(prefix or sysconfig.get_path("data"))
    header, library = prefix / "include" / "oneapi" / "dnnl" / "dnnl.hpp", prefix / "lib" / "libdnnl.so"
    for path, package in ((header, "onednn-devel-cpu-gomp"), (library, "onednn-cpu-gomp")):
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: pip install -r requirements.txt (it pins {package})")
    for source in SOURCES:
        if not source.exists():
            raise FileNotFoundError(f"{source} not found: build from a checkout of the repository")
    return [
        cxx or os.environ.get("CXX", "g++"), "-O3", "-std=c++17", "-shared", "-fPIC", "-fopenmp",
        "-isystem", jax.ffi.include_dir(), "-isystem", str(prefix / "include"), *map(str, SOURCES),
        f"-L{prefix / 'lib'}", "-ldnnl", f"-Wl,-rpath,{prefix / 'lib'}", "-o", str(LIBRARY),
    ]


def main() -> int:
    try:
        command = compile_command()
    except FileNotFoundError as e:
        print(f"stepjax.kernels.build: {e}", file=sys.stderr)
        return 1
    print(" ".join(command), flush=True)
    try:
        done = subprocess.run(command)
    except OSError as e:
        print(f"stepjax.kernels.build: cannot run the compiler ({e}); set $CXX to a C++17 compiler", file=sys.stderr)
        return 1
    if done.returncode:
        print("stepjax.kernels.build: compiling failed (see above); the XLA path runs instead", file=sys.stderr)
        return 1
    print(f"built {LIBRARY}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
