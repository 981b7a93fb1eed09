"""The measurements, each run in a fresh subprocess by `benchmarks.run` (``--worker SPEC``)."""

from __future__ import annotations

import json
import os
import sys
import time

from benchmarks.flops import model_flops_per_step, peak_flops, xla_flops
from benchmarks.measure import build_step, experiment, jsonable, load, median, peak_rss_gib, reset_peak_rss, setup


def worker_train(spec, run=None):
    """Compile and time the training step (and the evaluation step) of one configuration
    (`run`: its `_setup`, when the caller has built it already)."""
    import jax

    from stepjax import data, parallel
    from stepjax.train.step import make_eval_step

    run = run or setup(spec["exp"], spec.get("overrides", ()), spec["data_dir"])
    config, mesh, info, graphdef = run.config, run.mesh, run.info, run.graphdef
    state, batch, train_step, build_s = run.state, run.batch, run.train_step, run.build_s
    batch_size = config.train.global_batch

    t0 = time.perf_counter()
    lowered = train_step.lower(state, batch)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    result = {
        "exp": spec["exp"], "preset": config.model.preset, "controller": config.model.controller,
        "batch": batch_size, "devices": mesh.size, "build_s": build_s,
        "trace_lower_s": t1 - t0, "compile_s": t2 - t1, "trace_and_compile_s": t2 - t0,
    }
    if spec.get("compile_only"):
        result["load"] = load()
        return result
    cost = xla_flops(compiled)
    losses = []
    for _ in range(spec["warmup"]):
        state, metrics = compiled(state, batch)
        losses.append(float(metrics["loss"]))
    reset_peak_rss()
    times = []
    for _ in range(spec["repeats"]):
        t = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t)
        losses.append(float(metrics["loss"]))
    step_peak, lifetime_peak = peak_rss_gib()
    step_s = median(times)
    result.update(
        step_s=step_s, step_times_s=times, images_per_s=batch_size / step_s, losses=losses,
        step_peak_rss_gib=step_peak, peak_rss_gib=lifetime_peak, flops_per_step=cost,
        memory_stats=jax.devices()[0].memory_stats(),
    )
    if spec.get("eval", True):
        eval_step = make_eval_step(graphdef, config, info, mesh)
        batches = data.eval_batches(config.data, global_batch=config.train.eval_batch)
        first = parallel.global_batch(next(batches), mesh)
        t = time.perf_counter()
        eval_compiled = eval_step.lower(state, first).compile()
        result["eval_compile_s"] = time.perf_counter() - t
        jax.block_until_ready(eval_compiled(state, first))
        eval_times = []
        for _ in range(spec.get("eval_repeats", 3)):
            b = parallel.global_batch(next(batches), mesh)
            t = time.perf_counter()
            jax.block_until_ready(eval_compiled(state, b))
            eval_times.append(time.perf_counter() - t)
        result.update(eval_batch=config.train.eval_batch, eval_step_s=median(eval_times),
                      eval_images_per_s=config.train.eval_batch / median(eval_times))
    result["load"] = load()
    return result


def worker_interleaved(spec):
    """Same-time comparison on a shared machine: the steps of several configurations (and
    PyTorch's) compiled in one process and run in turn, round after round, so that every
    configuration sees the same background load. Ratios come from the per-configuration medians.

    In every round each configuration runs one untimed step before its timed one: the first step
    after the other configurations' pays for taking memory back from them (page faults, huge
    pages to assemble). Without it the first configuration of the round, which follows PyTorch's
    steps, timed 11.7, 7.4 and 4.7 s against 3.25 s measured alone (2026-12-01)."""
    import jax

    runners, batches = {}, {}
    for name, exp, conv, overrides in spec["configs"]:
        os.environ["STEPJAX_CONV"] = conv  # read when the step is traced: "xla" or "auto"
        compiled, state, batch, config = build_step(exp, overrides, spec["data_dir"])
        holder = {"state": state}

        def run(compiled=compiled, holder=holder, batch=batch):
            holder["state"], metrics = compiled(holder["state"], batch)
            jax.block_until_ready(metrics)

        runners[name], batches[name] = run, config.train.global_batch
    os.environ.pop("STEPJAX_CONV")
    if spec.get("torch"):
        from benchmarks.torch_resnet import TORCH_RUNS, make_torch_step

        for name, options in TORCH_RUNS.items():
            if spec.get("torch_compile") or not options.get("compile"):
                runners[name], batches[name] = make_torch_step(**options), options["batch"]
    times = {name: [] for name in runners}
    for name, run in runners.items():  # warm-up
        run()
    loads = []
    for _ in range(spec["rounds"]):
        for name, run in runners.items():
            run()
            t = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t)
        loads.append(load())
    medians = {name: median(ts) for name, ts in times.items()}
    return {"step_s": medians, "step_times_s": times, "rounds": spec["rounds"], "load": loads,
            "devices": jax.device_count(), "batch": batches}


def worker_pipeline(spec):
    """Images/s of the grain training loader alone, and of loader + on-device augmentation."""
    import jax

    from stepjax import data, parallel
    from stepjax.data import augment, normalize

    config = experiment(spec["exp"], (), spec["data_dir"])
    info = data.dataset_info(config.data)
    batch_size = config.train.global_batch
    mesh = parallel.data_mesh(config.mesh.num_devices)
    n = spec["batches"]

    def run(loader, fn):
        for _ in range(3):  # warm-up: threads started, prefetch filled, compiled
            fn(next(loader))
        t = time.perf_counter()
        for _ in range(n):
            fn(next(loader))
        return n * batch_size / (time.perf_counter() - t)

    loader = data.TrainLoader(config.data, seed=0, global_batch=batch_size)
    alone = run(loader, lambda b: b)

    @jax.jit
    def prepare(images, key):
        images = augment(images, key, padding=config.data.crop_padding, flip=config.data.flip)
        return normalize(images, info.mean, info.std)

    key = jax.random.key(0)
    loader = data.TrainLoader(config.data, seed=1, global_batch=batch_size)
    with_augment = run(loader, lambda b: jax.block_until_ready(
        prepare(parallel.global_batch(b, mesh)["image"], key)))
    return {"batch": batch_size, "batches": n, "loader_images_per_s": alone,
            "loader_augment_images_per_s": with_augment, "devices": mesh.size, "load": load()}


def worker_torch(spec):
    """The same network and step (ResNet-164 post-activation bottleneck, batch 128, SGD with
    momentum 0.9 and weight decay 1e-4, random crop + flip + normalisation) in PyTorch."""
    from benchmarks.torch_resnet import time_torch_step

    result = time_torch_step(
        depths=spec["depths"], batch=spec["batch"], warmup=spec["warmup"], repeats=spec["repeats"],
        channels_last=spec.get("channels_last", True), reset_peak=reset_peak_rss,
    )
    result["step_peak_rss_gib"], result["peak_rss_gib"] = peak_rss_gib()
    result["load"] = load()
    return result


def worker_gpu(spec):
    """Accelerator figures of one (dtype, batch) configuration (see `--gpu`)."""
    import jax

    run = setup(spec["exp"], spec.get("overrides", ()), spec["data_dir"])
    model_flops = model_flops_per_step(run.graphdef, run.state, run.batch, run.config, run.info)
    result = worker_train(spec, run)
    device = jax.devices()[0]
    result["device_kind"] = device.device_kind
    result["model_flops_per_step"] = model_flops
    peak = peak_flops(device.device_kind, spec["dtype"])
    if peak:
        result["peak_flops"] = peak
        result["mfu"] = model_flops / result["step_s"] / peak
    result["paper_epoch_s"] = 50_000 // result["batch"] * result["step_s"] + (
        10_000 / result["eval_images_per_s"] if result.get("eval_images_per_s") else 0.0)
    return result


# dense peak FLOP/s per chip from the vendors' data sheets. "float32" is the TF32 tensor-core peak on
# NVIDIA parts: at jax's default precision, XLA lets cuDNN and cuBLAS run fp32 convolutions and matmuls
# in TF32, so that is the ceiling an fp32 step can reach.


WORKERS = {"interleaved": worker_interleaved, "train": worker_train, "pipeline": worker_pipeline, "torch": worker_torch, "gpu": worker_gpu}


def worker_main(spec):
    """Run the measurement `spec` (its ``kind`` names the worker) and print its result line."""
    if spec.get("src"):  # measure another checkout's stepjax
        sys.path.insert(0, spec["src"])
    if spec.get("kind") != "gpu":
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        from stepjax import parallel

        if hasattr(parallel, "configure_cpu_devices"):
            parallel.configure_cpu_devices(spec.get("devices"))
        else:  # an older stepjax (--src): the same setting by hand
            import jax

            jax.config.update("jax_num_cpu_devices", spec.get("devices") or os.cpu_count() or 1)
    result = WORKERS[spec["kind"]](spec)
    print("BENCH_RESULT " + json.dumps(result, default=jsonable), flush=True)
