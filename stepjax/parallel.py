"""Distributed start-up, the `data` mesh and shardings: one code path for 1 CPU, N GPUs, a pod."""

from __future__ import annotations

import logging
import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

COORDINATOR_ENV = ("STEPJAX_COORDINATOR", "STEPJAX_NUM_PROCESSES", "STEPJAX_PROCESS_ID")


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
            raise ValueError(f"mesh.num_devices={num_devices}: there are {len(devices)} devices "
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
