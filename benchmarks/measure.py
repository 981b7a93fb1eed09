"""What every benchmark worker shares: paths, the machine's load, medians, peak memory, and the
training step of an experiment built the way `stepjax.train.loop.train` builds it."""

from __future__ import annotations

import os
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


DEFAULT_DATA = os.environ.get("STEPJAX_DATA_DIR") or str(ROOT.parent / "shared" / "data" / "cifar10")


MODEL_VARIANTS = ("resnet", "se", "cbam", "eca", "srm", "dia", "stepnet")  # plain ResNet, then one per attention controller


# glibc malloc settings of a tuned CPU run: the thresholds keep freed blocks mapped for reuse (PyTorch
# allocates from the main thread), huge pages take the page faults out of XLA's large blocks, which
# come from thread arenas (PyTorch's step is the same with them). The tunable is
# stepjax.parallel.HUGE_PAGES_TUNABLE, written out here so that the PyTorch worker does not import
# jax (test_bench checks that the two agree).
MALLOC = {"MALLOC_MMAP_THRESHOLD_": "4294967296", "MALLOC_TRIM_THRESHOLD_": "68719476736",
          "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}

CPU_PROTOCOL = "cifar10_resnet:cpu"  # ResNet-20 at the protocol's batch (32), and at batch 128


def load():
    return [round(v, 2) for v in os.getloadavg()]


def median(values):
    values = sorted(values)
    n = len(values)
    return values[n // 2] if n % 2 else 0.5 * (values[n // 2 - 1] + values[n // 2])


def reset_peak_rss():
    """Reset the kernel's resident high-water mark of this process (Linux); False if impossible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_gib():
    """(high-water mark since the last reset, lifetime peak) of this process's RSS in GiB."""
    import resource

    lifetime = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    hwm = None
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                hwm = int(line.split()[1]) / 2**20
    except OSError:
        pass
    return hwm, lifetime


# --------------------------------------------------------------------------------------------
# workers (run in a subprocess each)
# --------------------------------------------------------------------------------------------


def experiment(exp, overrides, data_dir):
    from stepjax.config import apply_overrides, load_experiment

    base = ["data.source='npz'", f"data.dir='{data_dir}'", "train.progress=False"]
    return apply_overrides(load_experiment(exp), base + list(overrides))


def controller_exp(controller):
    return "cifar10_resnet" if controller == "resnet" else f"cifar10_{controller}"


def setup(exp, overrides, data_dir):
    """What `stepjax.train.loop.train` builds before its first step: config, mesh, dataset info,
    replicated train state, the jitted train step and a first global batch (plus the seconds
    spent building and placing the model)."""
    import types

    import jax

    from stepjax import data, parallel
    from stepjax.models import build_model
    from stepjax.train.step import init_state, learning_rate_schedule, make_optimizer, make_train_step

    config = experiment(exp, overrides, data_dir)
    mesh = parallel.data_mesh(config.mesh.num_devices)
    info = data.dataset_info(config.data)
    loader = data.TrainLoader(config.data, seed=config.seed, global_batch=config.train.global_batch)
    schedule = learning_rate_schedule(config.optim, loader.steps_per_epoch, config.train.epochs * loader.steps_per_epoch)
    tx = make_optimizer(config.optim, schedule)
    t0 = time.perf_counter()
    graphdef, state = init_state(build_model(config), tx)
    state = jax.device_put(state, parallel.replicated(mesh))
    build_s = time.perf_counter() - t0
    return types.SimpleNamespace(
        config=config, mesh=mesh, info=info, graphdef=graphdef, state=state, build_s=build_s,
        train_step=make_train_step(graphdef, tx, schedule, config, info, mesh),
        batch=parallel.global_batch(next(loader), mesh),
    )


def build_step(exp, overrides, data_dir):
    """(compiled train step, state, batch, config) of one experiment, as `train` builds them."""
    run = setup(exp, overrides, data_dir)
    return run.train_step.lower(run.state, run.batch).compile(), run.state, run.batch, run.config


def jsonable(x):
    try:
        import numpy as np

        if isinstance(x, np.generic):
            return x.item()
    except ImportError:
        pass
    return str(x)


# --------------------------------------------------------------------------------------------
# the parent
# --------------------------------------------------------------------------------------------
