"""Distributed start-up, the `data` mesh and shardings: one code path for 1 CPU, N GPUs, a pod."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os
import sys

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from stepjax.errors import UserError

COORDINATOR_ENV = ("STEPJAX_COORDINATOR", "STEPJAX_NUM_PROCESSES", "STEPJAX_PROCESS_ID")
CPU_DEVICES_ENV = "STEPJAX_CPU_DEVICES"
_DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
# How long a CPU device's thread waits for the others at a collective (e.g. the gradient all-reduce)
# before XLA warns, and before it aborts the process. XLA's defaults (20 s, then 40 s more) kill a
# training whenever other jobs starve one core for a minute; these wait out minutes of load and
# still end a real deadlock within the hour. Set on CPU-only hosts: an accelerator plugin (libtpu,
# a CUDA plugin) parses XLA_FLAGS with its own XLA, which may not know them.
COLLECTIVE_TIMEOUTS = {
    "--xla_cpu_collective_call_warn_stuck_timeout_seconds": 300,
    "--xla_cpu_collective_call_terminate_timeout_seconds": 1800,
}


def host_cores() -> int:
    """The number of cores this process may run on (its CPU affinity, else `os.cpu_count()`)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def configure_cpu_devices(num_devices: int | None = None) -> int:
    """Split the host into several XLA CPU devices, so that a batch sharded over the ``data`` mesh
    keeps every core busy. Call it at start-up, before JAX creates its backends (importing jax
    is fine; the first `jax.devices()` or computation is too late).

    One XLA CPU device keeps only about 1.5 of 2 cores busy in a ResNet training step; one
    device per core, with the batch split over them, runs the step faster with the same
    mathematics (BatchNorm statistics stay global under `jit`).

    **Arguments:**

    - `num_devices`: how many CPU devices. None: ``$STEPJAX_CPU_DEVICES`` if set, else one per
      core (`host_cores`). A device count already given in ``XLA_FLAGS``
      (``--xla_force_host_platform_device_count``, as the tests do) is left alone.

    **Returns:**

    The number of CPU devices JAX will create. Only the CPU backend is affected: on a GPU or
    TPU host the accelerators are still the default devices. Where JAX runs on the CPU alone, the
    collective timeouts of `COLLECTIVE_TIMEOUTS` are added to ``XLA_FLAGS`` too (a value already
    there wins).
    """
    if cpu_only():
        set_default_xla_flags(COLLECTIVE_TIMEOUTS)
    if _DEVICE_COUNT_FLAG in os.environ.get("XLA_FLAGS", ""):
        value = os.environ["XLA_FLAGS"].split(_DEVICE_COUNT_FLAG + "=")[1].split()[0]
        return int(value)
    if num_devices is None:
        num_devices = int(os.environ.get(CPU_DEVICES_ENV) or host_cores())
    if num_devices < 1:
        raise UserError(f"configure_cpu_devices: num_devices must be >= 1, got {num_devices}.")
    if jax.config.jax_num_cpu_devices != num_devices:  # a second call (e.g. the study's next run) is a no-op
        jax.config.update("jax_num_cpu_devices", int(num_devices))
    return int(num_devices)


def cpu_only() -> bool:
    """Whether JAX will run on the CPU alone here (``JAX_PLATFORMS=cpu``, or no GPU/TPU plugin)."""
    return jax.config.jax_platforms == "cpu" or not _accelerator_plugins()


def _accelerator_plugins() -> bool:
    """Whether JAX may find a GPU or TPU here: a PJRT plugin or libtpu is installed."""
    return (any(importlib.util.find_spec(name) for name in ("jax_plugins", "libtpu"))
            or bool(importlib.metadata.entry_points(group="jax_plugins")))


def set_default_xla_flags(flags: dict) -> None:
    """Append each of `flags` (``--name`` -> value) to ``$XLA_FLAGS`` unless it is set there already.
    XLA reads the variable once, when the first backend starts: call this before."""
    given = os.environ.get("XLA_FLAGS", "")
    added = [f"{name}={value}" for name, value in flags.items() if f"{name}=" not in given]
    if added:
        os.environ["XLA_FLAGS"] = " ".join([given, *added]).strip()


# glibc's tunable that backs its large blocks with transparent huge pages. XLA:CPU allocates a step's
# buffers (GBs for a deep network: the scan's stored activations) from its worker threads, where
# glibc maps each large block freshly and unmaps it when freed, so every step faults in every 4 KiB
# page again (0.73 M faults, 1.3 s of system time in a ResNet-164 step at batch 128). With huge
# pages that is 2 k faults; malloc's thresholds (which serve PyTorch) do not reach thread arenas.
# glibc reads it when a process starts: the Makefile exports it, the command-line tools restart with it
# (`restart_with_huge_pages`), `host_pages` reports it.
HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"
HUGE_PAGES_ENV = "STEPJAX_HUGE_PAGES"  # 0: the command-line tools do not restart for huge pages
_THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"


def host_pages() -> str:
    """One line saying which pages back this process's large host allocations, and how to get
    huge pages where they are not used (logged by training on the CPU).

    **Returns:**

    ``"huge pages (...)"`` when the kernel gives transparent huge pages to every large mapping
    (``always``) or ``$GLIBC_TUNABLES`` holds `HUGE_PAGES_TUNABLE` and the kernel gives them on
    request (``madvise``); else ``"4 KiB pages: ..."`` with the reason and, if there is one, the fix.
    """
    setting = thp_setting()
    if setting == "always":
        return "huge pages (transparent huge pages: always)"
    if setting == "never":
        return f"4 KiB pages: this kernel's transparent huge pages are off ({_THP_SETTING}: never)"
    if HUGE_PAGES_TUNABLE not in os.environ.get("GLIBC_TUNABLES", "").split(":"):
        return (f"4 KiB pages: GLIBC_TUNABLES={HUGE_PAGES_TUNABLE} when the process starts (make and the command-line tools set it) "
                "makes a CPU training step about 1.15x faster")
    return f"huge pages ({HUGE_PAGES_TUNABLE}; transparent huge pages: {setting})"


def restart_with_huge_pages() -> None:
    """Run this command again in place of this process (`os.execv`, same interpreter and
    arguments) with `HUGE_PAGES_TUNABLE` added to ``$GLIBC_TUNABLES``, where that makes CPU steps
    faster: JAX runs on the CPU alone, the kernel gives transparent huge pages on request
    (``madvise``), glibc is 2.35 or newer, and neither ``$GLIBC_TUNABLES`` already decides
    ``glibc.malloc.hugetlb`` nor ``$STEPJAX_HUGE_PAGES`` is ``0``. Otherwise it returns.

    glibc reads its tunables only when a process starts, so the command-line tools (training,
    the study, the lottery, the analysis, evaluation) call this first, before any work; `make`
    sets the variable itself. Never call it from a process that has work to lose.
    """
    tunables = [t for t in os.environ.get("GLIBC_TUNABLES", "").split(":") if t]
    name = HUGE_PAGES_TUNABLE.split("=")[0]
    if (any(t.split("=")[0] == name for t in tunables) or os.environ.get(HUGE_PAGES_ENV) == "0"
            or thp_setting() != "madvise" or glibc_version() < (2, 35) or not cpu_only()):
        return
    os.environ["GLIBC_TUNABLES"] = ":".join([*tunables, HUGE_PAGES_TUNABLE])
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])


def glibc_version() -> tuple[int, ...]:
    """The C library's version where it is glibc, else ``()`` (which compares below any version)."""
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
    except (AttributeError, ValueError, OSError):  # not glibc, or not a POSIX system
        return ()
    return tuple(int(part) for part in version.split(".")[:2]) if name == "glibc" else ()


def thp_setting() -> str:
    """The kernel's transparent huge page mode (``always``, ``madvise``, ``never``), or
    ``unknown`` where it cannot be read (not Linux)."""
    try:
        with open(_THP_SETTING) as f:
            return f.read().split("[")[1].split("]")[0]
    except (OSError, IndexError):
        return "unknown"


def initialize_distributed() -> None:
    """Call `jax.distributed.initialize` when launched as several processes.

    Explicit: ``STEPJAX_COORDINATOR=host:port STEPJAX_NUM_PROCESSES=N STEPJAX_PROCESS_ID=i``
    (CPU processes then use gloo collectives). Automatic: TPU pods (``TPU_WORKER_HOSTNAMES`` /
    ``MEGASCALE_*``), SLURM jobs with several tasks, where JAX finds the cluster itself. A single
    process does nothing.
    """
    if all(os.environ.get(k) for k in COORDINATOR_ENV):
        address, num, pid = (os.environ[k] for k in COORDINATOR_ENV)
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(address, int(num), int(pid))
    elif int(os.environ.get("SLURM_NTASKS", "1")) > 1 or os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",") > 0:
        jax.distributed.initialize()
    else:
        return
    logging.info("process %d of %d, %d local devices of %d", jax.process_index(), jax.process_count(),
                 jax.local_device_count(), jax.device_count())


def data_mesh(num_devices: int | None = None) -> Mesh:
    """A one-axis mesh named ``data`` over every device of every process (or the first
    `num_devices`, single-process only)."""
    devices = jax.devices()
    if num_devices is not None:
        if not 1 <= num_devices <= len(devices) or (jax.process_count() > 1 and num_devices != len(devices)):
            raise UserError(f"mesh.num_devices={num_devices}: there are {len(devices)} devices "
                             "(a subset is allowed only in a single process).")
        devices = devices[:num_devices]
    return Mesh(np.asarray(devices), ("data",))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec("data"))


def global_batch(local: dict, mesh: Mesh) -> dict:
    """Assemble each process's slice of the batch into global arrays sharded over ``data``."""
    sharding = batch_sharded(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()}
