"""`make bench`: speed, compile time and memory of the real training step, on this machine.

    python -m benchmarks.run [--quick] [--out FILE] [--devices N] [--no-torch] [--only NAME ...]
    python -m benchmarks.run --gpu [--out FILE]        # accelerator figures (fp32/bf16, batch 128/1024; SE, StepNet)

Every measurement runs in a fresh subprocess, so that compile times are cold and the peak memory
(`ru_maxrss`, and the resident high-water mark of the steady-state steps alone) belongs to one
configuration. The training step is `stepjax.train.step.make_train_step`, built as
`stepjax.train.loop.train` builds it (augmentation, normalisation, forward, backward, SGD with
momentum and weight decay, donated state), fed a real CIFAR-10 batch from the npz copy.

The parent prints a table and writes JSON (default ``benchmarks/results/latest.json``); the
load average of the machine is recorded next to every figure, because other jobs may share it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = os.environ.get("STEPJAX_DATA_DIR") or str(ROOT.parent / "shared" / "data" / "cifar10")
MODEL_VARIANTS = ("resnet", "se", "cbam", "eca", "srm", "dia", "stepnet")  # plain ResNet, then one per attention controller
CPU_PROTOCOL = "cifar10_resnet:cpu"  # ResNet-20 at the protocol's batch (32), and at batch 128


def _load():
    return [round(v, 2) for v in os.getloadavg()]


def _median(values):
    values = sorted(values)
    n = len(values)
    return values[n // 2] if n % 2 else 0.5 * (values[n // 2 - 1] + values[n // 2])


def _reset_peak_rss():
    """Reset the kernel's resident high-water mark of this process (Linux); False if impossible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_rss_gib():
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


def _experiment(exp, overrides, data_dir):
    from stepjax.config import apply_overrides, load_experiment

    base = ["data.source='npz'", f"data.dir='{data_dir}'", "train.progress=False"]
    return apply_overrides(load_experiment(exp), base + list(overrides))


def _controller_exp(controller):
    return "cifar10_resnet" if controller == "resnet" else f"cifar10_{controller}"


def _setup(exp, overrides, data_dir):
    """What `stepjax.train.loop.train` builds before its first step: config, mesh, dataset info,
    replicated train state, the jitted train step and a first global batch (plus the seconds
    spent building and placing the model)."""
    import types

    import jax

    from stepjax import data, parallel
    from stepjax.train.loop import build_model
    from stepjax.train.step import init_state, learning_rate_schedule, make_optimizer, make_train_step

    config = _experiment(exp, overrides, data_dir)
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


def worker_train(spec, run=None):
    """Compile and time the training step (and the evaluation step) of one configuration
    (`run`: its `_setup`, when the caller has built it already)."""
    import jax

    from stepjax import data, parallel
    from stepjax.train.step import make_eval_step

    run = run or _setup(spec["exp"], spec.get("overrides", ()), spec["data_dir"])
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
        result["load"] = _load()
        return result
    cost = _flops(compiled)
    losses = []
    for _ in range(spec["warmup"]):
        state, metrics = compiled(state, batch)
        losses.append(float(metrics["loss"]))
    _reset_peak_rss()
    times = []
    for _ in range(spec["repeats"]):
        t = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t)
        losses.append(float(metrics["loss"]))
    step_peak, lifetime_peak = _peak_rss_gib()
    step_s = _median(times)
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
        result.update(eval_batch=config.train.eval_batch, eval_step_s=_median(eval_times),
                      eval_images_per_s=config.train.eval_batch / _median(eval_times))
    result["load"] = _load()
    return result


def _build_step(exp, overrides, data_dir):
    """(compiled train step, state, batch, config) of one experiment, as `train` builds them."""
    run = _setup(exp, overrides, data_dir)
    return run.train_step.lower(run.state, run.batch).compile(), run.state, run.batch, run.config


def worker_interleaved(spec):
    """Same-time comparison on a shared machine: the steps of several configurations (and
    PyTorch's) compiled in one process and run in turn, round after round, so that every
    configuration sees the same background load. Ratios come from the per-configuration medians."""
    import jax

    runners = {}
    for name, exp in spec["configs"]:
        compiled, state, batch, config = _build_step(exp, (), spec["data_dir"])
        holder = {"state": state}

        def run(compiled=compiled, holder=holder, batch=batch):
            holder["state"], metrics = compiled(holder["state"], batch)
            jax.block_until_ready(metrics)

        runners[name] = run
    if spec.get("torch"):
        sys.path.insert(0, str(ROOT))
        from benchmarks.torch_resnet import make_torch_step

        runners["pytorch resnet164"] = make_torch_step(depths=(18, 18, 18), batch=128)
    times = {name: [] for name in runners}
    for name, run in runners.items():  # warm-up
        run()
    loads = []
    for _ in range(spec["rounds"]):
        for name, run in runners.items():
            t = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t)
        loads.append(_load())
    medians = {name: _median(ts) for name, ts in times.items()}
    return {"step_s": medians, "step_times_s": times, "rounds": spec["rounds"], "load": loads,
            "devices": jax.device_count()}


def _flops(compiled):
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        return float(cost.get("flops", 0.0)) or None
    except Exception:  # cost analysis is best effort
        return None


def _jaxpr_flops(jaxpr):
    """Multiply-add FLOPs (2 per MAC) of the convolutions and matmuls in a jaxpr, sub-jaxprs included
    (a scan's body counted `length` times). Backend-independent, unlike XLA's cost analysis, which
    does not count the convolutions that XLA:GPU hands to cuDNN."""
    import numpy as np
    from jax.extend.core import ClosedJaxpr, Jaxpr

    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "conv_general_dilated":
            rhs = eqn.invars[1].aval.shape
            dn = eqn.params["dimension_numbers"]
            kernel = np.prod([rhs[i] for i in dn.rhs_spec[2:]]) * rhs[dn.rhs_spec[1]]  # spatial x in-features
            total += 2.0 * np.prod(eqn.outvars[0].aval.shape) * kernel
        elif name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            total += 2.0 * np.prod(eqn.outvars[0].aval.shape) * np.prod([eqn.invars[0].aval.shape[d] for d in contract])
        times = eqn.params.get("length", 1) if name == "scan" else 1
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else (param,):
                if isinstance(sub, ClosedJaxpr):
                    total += times * _jaxpr_flops(sub.jaxpr)
                elif isinstance(sub, Jaxpr):
                    total += times * _jaxpr_flops(sub)
    return total


def model_flops_per_step(graphdef, state, batch, config, info):
    """Model FLOPs of one training step: 3x the forward pass's convolution and matmul FLOPs (the
    backward pass costs about twice the forward), the usual convention for model FLOP utilisation."""
    import jax
    from flax import nnx

    from stepjax.train.step import model_inputs

    def forward(state, image):
        model = nnx.merge(graphdef, state.params, state.rest, copy=True)
        return model.solve(model_inputs(config, info, image))[0]

    return 3.0 * _jaxpr_flops(jax.make_jaxpr(forward)(state, batch["image"]).jaxpr)


def worker_pipeline(spec):
    """Images/s of the grain training loader alone, and of loader + on-device augmentation."""
    import jax
    import numpy as np

    from stepjax import data, parallel
    from stepjax.data import augment, normalize

    config = _experiment(spec["exp"], (), spec["data_dir"])
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
            "loader_augment_images_per_s": with_augment, "devices": mesh.size, "load": _load()}


def worker_torch(spec):
    """The same network and step (ResNet-164 post-activation bottleneck, batch 128, SGD with
    momentum 0.9 and weight decay 1e-4, random crop + flip + normalisation) in PyTorch."""
    sys.path.insert(0, str(ROOT))
    from benchmarks.torch_resnet import time_torch_step

    result = time_torch_step(
        depths=spec["depths"], batch=spec["batch"], warmup=spec["warmup"], repeats=spec["repeats"],
        channels_last=spec.get("channels_last", True), reset_peak=_reset_peak_rss,
    )
    result["step_peak_rss_gib"], result["peak_rss_gib"] = _peak_rss_gib()
    result["load"] = _load()
    return result


def worker_gpu(spec):
    """Accelerator figures of one (dtype, batch) configuration (see `--gpu`)."""
    import jax

    run = _setup(spec["exp"], spec.get("overrides", ()), spec["data_dir"])
    model_flops = model_flops_per_step(run.graphdef, run.state, run.batch, run.config, run.info)
    result = worker_train(spec, run)
    device = jax.devices()[0]
    result["device_kind"] = device.device_kind
    result["model_flops_per_step"] = model_flops
    peak = _peak_flops(device.device_kind, spec["dtype"])
    if peak:
        result["peak_flops"] = peak
        result["mfu"] = model_flops / result["step_s"] / peak
    result["paper_epoch_s"] = 50_000 // result["batch"] * result["step_s"] + (
        10_000 / result["eval_images_per_s"] if result.get("eval_images_per_s") else 0.0)
    return result


# dense peak FLOP/s per chip from the vendors' data sheets. "float32" is the TF32 tensor-core peak on
# NVIDIA parts: at jax's default precision, XLA lets cuDNN and cuBLAS run fp32 convolutions and matmuls
# in TF32, so that is the ceiling an fp32 step can reach.
_PEAKS = {
    "H100": {"float32": 495e12, "bfloat16": 989e12},
    "H200": {"float32": 495e12, "bfloat16": 989e12},
    "A100": {"float32": 156e12, "bfloat16": 312e12},
    "L4": {"float32": 60e12, "bfloat16": 121e12},
    "TPU v4": {"float32": 275e12, "bfloat16": 275e12},
    "TPU v5 lite": {"float32": 197e12, "bfloat16": 197e12},
}


def _peak_flops(kind, dtype):
    for name, peaks in _PEAKS.items():
        if name.lower() in kind.lower():
            return peaks[dtype]
    return None


WORKERS = {"interleaved": worker_interleaved, "train": worker_train, "pipeline": worker_pipeline, "torch": worker_torch, "gpu": worker_gpu}


def _worker_main(spec):
    if spec.get("kind") != "gpu":
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        from stepjax import parallel

        if hasattr(parallel, "configure_cpu_devices"):
            parallel.configure_cpu_devices(spec.get("devices"))
        else:  # an older stepjax (--src): the same setting by hand
            import jax

            jax.config.update("jax_num_cpu_devices", spec.get("devices") or os.cpu_count() or 1)
    sys.path.insert(1, str(ROOT))
    result = WORKERS[spec["kind"]](spec)
    print("BENCH_RESULT " + json.dumps(result, default=_jsonable), flush=True)


def _jsonable(x):
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


def run_worker(spec, timeout=1200):
    """Run one measurement in a fresh interpreter; its result dict (or an error entry)."""
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    first = [spec["src"], str(ROOT)] if spec.get("src") else [str(ROOT)]
    env["PYTHONPATH"] = os.pathsep.join(first + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    t = time.perf_counter()
    load_before = _load()
    try:
        proc = subprocess.run(
            [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--worker", json.dumps(spec)],
            capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env,
        )
    except subprocess.TimeoutExpired:
        return {**spec, "error": f"timed out after {timeout} s", "load_before": load_before}
    for line in proc.stdout.splitlines():
        if line.startswith("BENCH_RESULT "):
            result = json.loads(line[len("BENCH_RESULT "):])
            result.update(name=spec["name"], wall_s=time.perf_counter() - t, load_before=load_before)
            return result
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-15:]
    return {**spec, "error": "\n".join(tail), "load_before": load_before}


def plan(args):
    """The list of measurements to run."""
    quick = args.quick
    common = {"data_dir": args.data_dir, "devices": args.devices, "src": args.src}
    warm, reps = (1, 2) if quick else (1, args.repeats)
    specs = []
    r164 = ("resnet",) if quick else MODEL_VARIANTS
    for c in r164:  # controllers: fewer repeats, their ratios come from the interleaved run
        specs.append({**common, "kind": "train", "name": f"resnet164/{c}", "exp": _controller_exp(c),
                      "warmup": warm, "repeats": reps if c == "resnet" else min(reps, 2), "eval": not quick,
                      "eval_repeats": 2 if c == "resnet" else 1})
    if not quick and args.devices is None:  # what one device per core buys, same run
        specs.append({**common, "devices": 1, "kind": "train", "name": "resnet164/resnet (1 device)",
                      "exp": "cifar10_resnet", "warmup": warm, "repeats": reps, "eval": False})
    specs.append({**common, "kind": "train", "name": "resnet20/resnet (cpu protocol)", "exp": CPU_PROTOCOL,
                  "warmup": 2, "repeats": 5 if quick else 10, "eval": True})
    specs.append({**common, "kind": "train", "name": "resnet20/resnet (batch 128)", "exp": CPU_PROTOCOL,
                  "overrides": ["train.global_batch=128"], "warmup": 2, "repeats": 5 if quick else 10, "eval": False})
    specs.append({**common, "kind": "train", "name": "resnet56/resnet (compile)", "exp": "cifar10_resnet",
                  "overrides": ["model.preset='resnet56'"], "compile_only": True})
    specs.append({**common, "kind": "pipeline", "name": "input pipeline", "exp": "cifar10_resnet",
                  "batches": 40 if quick else 150})
    if not quick:
        configs = [[f"resnet164/{c}", _controller_exp(c)] for c in MODEL_VARIANTS]
        specs.append({**common, "kind": "interleaved", "name": "interleaved", "configs": configs,
                      "rounds": args.rounds, "torch": args.torch})
    if args.torch and not quick:
        specs.append({"kind": "torch", "name": "pytorch resnet164", "depths": [18, 18, 18], "batch": 128,
                      "warmup": warm, "repeats": reps, "channels_last": True})
    if args.only:
        specs = [s for s in specs if any(o in s["name"] for o in args.only)]
    return specs


def plan_gpu(args):
    """Plain ResNet-164 in fp32 and bf16 at batch 128 and 1024, then SE and StepNet (fp32, batch 128)."""
    configs = [("resnet", dtype, batch) for dtype in ("float32", "bfloat16") for batch in (128, 1024)]
    configs += [(c, "float32", 128) for c in ("se", "stepnet")]
    specs = [{"kind": "gpu", "name": f"gpu {c}/{dtype}/b{batch}", "exp": _controller_exp(c),
              "data_dir": args.data_dir, "dtype": dtype, "warmup": 3, "repeats": 20,
              "overrides": [f"model.dtype='{dtype}'", f"train.global_batch={batch}", "train.eval_batch=1000"]}
             for c, dtype, batch in configs]
    if args.only:
        specs = [s for s in specs if any(o in s["name"] for o in args.only)]
    return specs


def environment():
    info = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "python": platform.python_version(), "platform": platform.platform(), "cores": os.cpu_count()}
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                info["cpu"] = line.split(":", 1)[1].strip()
    except OSError:
        pass
    try:
        info["memory_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        pass
    from importlib import metadata

    for pkg in ("jax", "jaxlib", "flax", "optax", "grain", "numpy", "torch"):
        try:
            info[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            info[pkg] = None
    info["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "")
    return info


def summarise(results):
    """Ratios and the issue's targets, from the measured entries."""
    by = {r["name"]: r for r in results if "error" not in r}
    out = {}
    plain = by.get("resnet164/resnet")
    r56 = by.get("resnet56/resnet (compile)")
    torch = by.get("pytorch resnet164")
    pipe = by.get("input pipeline")
    inter = by.get("interleaved")
    if inter:  # same-time medians: the ratios that the targets use
        steps = inter["step_s"]
        base = steps.get("resnet164/resnet")
        for c in MODEL_VARIANTS[1:]:
            if base and f"resnet164/{c}" in steps:
                out[f"step_ratio_{c}_vs_plain"] = steps[f"resnet164/{c}"] / base
        if base and "pytorch resnet164" in steps:
            out["speed_ratio_jax_vs_torch"] = steps["pytorch resnet164"] / base
    elif plain:
        for c in MODEL_VARIANTS[1:]:
            if f"resnet164/{c}" in by:
                out[f"step_ratio_{c}_vs_plain"] = by[f"resnet164/{c}"]["step_s"] / plain["step_s"]
    if plain:
        out["compile_resnet164_s"] = plain["compile_s"]
    if plain and r56:
        out["compile_ratio_164_vs_56"] = plain["compile_s"] / r56["compile_s"]
    if plain and torch:
        out.setdefault("speed_ratio_jax_vs_torch", torch["step_s"] / plain["step_s"])
        out["peak_rss_ratio_jax_vs_torch"] = plain["step_peak_rss_gib"] / torch["step_peak_rss_gib"]
    if pipe and plain:
        fastest = max(r["images_per_s"] for n, r in by.items() if "images_per_s" in r and n.startswith("resnet"))
        out["pipeline_vs_fastest_step"] = pipe["loader_augment_images_per_s"] / fastest
    targets = {}
    if "speed_ratio_jax_vs_torch" in out:
        targets["resnet164 step >= pytorch"] = out["speed_ratio_jax_vs_torch"] >= 1.0
    for c in ("se", "stepnet"):
        if f"step_ratio_{c}_vs_plain" in out:
            targets[f"{c} step <= 1.15x plain"] = out[f"step_ratio_{c}_vs_plain"] <= 1.15
    if "compile_ratio_164_vs_56" in out:
        targets["compile 164 <= 1.5x 56 and < 30 s"] = out["compile_ratio_164_vs_56"] <= 1.5 and out["compile_resnet164_s"] < 30
    if "pipeline_vs_fastest_step" in out:
        targets["pipeline >= 3x step"] = out["pipeline_vs_fastest_step"] >= 3
    if "peak_rss_ratio_jax_vs_torch" in out:
        targets["peak memory <= pytorch"] = out["peak_rss_ratio_jax_vs_torch"] <= 1.0
    out["targets_met"] = targets
    return out


def table(results):
    rows = ["| configuration | devices | batch | compile s | step s | images/s | eval images/s | step peak RSS GiB | process peak GiB | load (1/5/15 min) |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]

    def f(v, fmt="{:.2f}"):
        return "-" if v is None else fmt.format(v)

    for r in results:
        if "error" in r:
            rows.append(f"| {r['name']} | error: {r['error'].splitlines()[-1][:80]} | | | | | | | | |")
            continue
        if r["name"] == "interleaved":
            for name, t in r["step_s"].items():
                rows.append(f"| {name} (interleaved, same time) | {r['devices'] if 'pytorch' not in name else '-'} | 128 | - | "
                            f"{t:.3f} | {128 / t:.1f} | - | - | - | {r['load'][-1]} |")
            continue
        if r["name"] == "input pipeline":
            rows.append(f"| {r['name']} (loader alone / + augment) | {r['devices']} | {r.get('batch', '-')} | - | - | "
                        f"{r['loader_images_per_s']:.0f} / {r['loader_augment_images_per_s']:.0f} | - | - | - | {r['load']} |")
            continue
        rows.append(
            f"| {r['name']} | {r.get('devices', '-')} | {r.get('batch', '-')} | {f(r.get('compile_s'), '{:.1f}')} | {f(r.get('step_s'), '{:.3f}')} | "
            f"{f(r.get('images_per_s'), '{:.1f}')} | {f(r.get('eval_images_per_s'), '{:.0f}')} | "
            f"{f(r.get('step_peak_rss_gib'))} | {f(r.get('peak_rss_gib'))} | {r.get('load')} |")
    return "\n".join(rows)


def gpu_table(results):
    """The accelerator rows: device, dtype, batch, compile, step, images/s, MFU, memory, paper epoch."""
    rows = ["| configuration | device | compile s | step ms | images/s | eval images/s | MFU | peak GPU memory GiB | epoch s (50k train + 10k test, this batch) |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        if "error" in r:
            rows.append(f"| {r['name']} | error: {r['error'].splitlines()[-1][:80]} | | | | | | | |")
            continue
        mfu = f"{100 * r['mfu']:.1f} %" if r.get("mfu") is not None else "-"
        peak = (r.get("memory_stats") or {}).get("peak_bytes_in_use")
        rows.append(f"| {r['name']} | {r.get('device_kind')} | {r['compile_s']:.1f} | {1000 * r['step_s']:.1f} | "
                    f"{r['images_per_s']:.0f} | {r.get('eval_images_per_s', 0):.0f} | {mfu} | "
                    f"{'-' if peak is None else f'{peak / 2**30:.2f}'} | {r['paper_epoch_s']:.1f} |")
    return "\n".join(rows)


def markdown(out):
    """The results section of docs/BENCHMARKS.md from a JSON written by this script."""
    env = out["environment"]
    if out.get("gpu"):
        return "\n".join([f"Host: {env.get('cpu')}, {env['cores']} cores; Python {env['python']}, jax/jaxlib "
                          f"{env['jax']}/{env['jaxlib']}, flax {env['flax']}, optax {env['optax']}, grain {env['grain']}; "
                          f"{env['date']}; total {out['total_wall_s'] / 60:.1f} min.", "", gpu_table(out["results"])])
    lines = [f"Machine: {env.get('cpu')}, {env['cores']} cores, {env.get('memory_gib')} GiB; "
             f"Python {env['python']}, jax/jaxlib {env['jax']}/{env['jaxlib']}, flax {env['flax']}, "
             f"optax {env['optax']}, grain {env['grain']}, torch {env['torch']}; {env['date']}; "
             f"total {out['total_wall_s'] / 60:.1f} min.", "", table(out["results"]), ""]
    s = out["summary"]
    names = {"speed_ratio_jax_vs_torch": "ResNet-164 step speed, JAX / PyTorch (same time)",
             "peak_rss_ratio_jax_vs_torch": "ResNet-164 step peak RSS, JAX / PyTorch",
             "compile_ratio_164_vs_56": "compile ResNet-164 / ResNet-56",
             "compile_resnet164_s": "compile ResNet-164 (s)",
             "pipeline_vs_fastest_step": "input pipeline (loader + augment) / fastest training step"}
    lines += ["| ratio | value |", "| --- | --- |"]
    for key, value in s.items():
        if key != "targets_met":
            label = names.get(key, key.replace("step_ratio_", "step time ").replace("_vs_plain", " / plain"))
            lines.append(f"| {label} | {value:.2f} |")
    figures = {"resnet164 step >= pytorch": ("speed_ratio_jax_vs_torch", "x PyTorch's speed"),
               "se step <= 1.15x plain": ("step_ratio_se_vs_plain", "x plain"),
               "stepnet step <= 1.15x plain": ("step_ratio_stepnet_vs_plain", "x plain"),
               "compile 164 <= 1.5x 56 and < 30 s": ("compile_ratio_164_vs_56", "x ResNet-56"),
               "pipeline >= 3x step": ("pipeline_vs_fastest_step", "x the fastest step"),
               "peak memory <= pytorch": ("peak_rss_ratio_jax_vs_torch", "x PyTorch's")}
    lines += ["", "| target | measured | met |", "| --- | --- | --- |"]
    for k, v in s["targets_met"].items():
        key, unit = figures[k]
        lines.append(f"| {k} | {s[key]:.2f}{unit} | {'met' if v else 'MISSED'} |")
    return "\n".join(lines)


MARKERS = {False: ("<!-- bench:results -->", "<!-- /bench:results -->"),
           True: ("<!-- bench:gpu -->", "<!-- /bench:gpu -->")}


def write_docs(out, path):
    """Replace the results block of `path` (between the markers of a CPU or a GPU run) with `markdown(out)`."""
    BEGIN, END = MARKERS[bool(out.get("gpu"))]
    text = Path(path).read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{path} has no {BEGIN} ... {END} block to replace; add the two markers where the results go")
    head, rest = text.split(BEGIN, 1)
    Path(path).write_text(head + BEGIN + "\n" + markdown(out) + "\n" + END + rest.split(END, 1)[1])


def _write(path, env, args, results, start):
    out = {"environment": env, "quick": args.quick, "gpu": args.gpu, "total_wall_s": time.perf_counter() - start,
           "results": results, "summary": summarise(results)}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(out, indent=2, default=_jsonable))
    return out


def merge(outs):
    """One result set from several JSONs of the same kind (e.g. a GPU session split over calls)."""
    if len({bool(o.get("gpu")) for o in outs}) > 1:
        raise SystemExit("--markdown: cannot merge CPU and GPU result files; give one kind at a time")
    results = [r for o in outs for r in o["results"]]
    return {**outs[0], "results": results, "summary": summarise(results),
            "total_wall_s": sum(o["total_wall_s"] for o in outs)}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="plain ResNet-164 only, fewer repeats, no evaluation of it, no PyTorch (< 3 min)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "latest.json"), help="JSON output file")
    parser.add_argument("--devices", type=int, default=None,
                        help="CPU devices (default: one per core, see stepjax.parallel.configure_cpu_devices)")
    parser.add_argument("--repeats", type=int, default=3, help="timed ResNet-164 training steps per configuration")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds of the interleaved same-time comparison (all controllers and PyTorch)")
    parser.add_argument("--data-dir", default=DEFAULT_DATA, help="directory with train.npz / test.npz")
    parser.add_argument("--no-torch", dest="torch", action="store_false", help="skip the PyTorch comparison")
    parser.add_argument("--only", nargs="*", help="run only the measurements whose name contains one of these")
    parser.add_argument("--gpu", action="store_true",
                        help="accelerator figures: ResNet-164 fp32/bf16 at batch 128/1024 on the default backend")
    parser.add_argument("--src", help="measure the stepjax package in this directory (e.g. an older checkout, "
                        "for before/after figures) instead of this one")
    parser.add_argument("--markdown", metavar="JSON", nargs="+", help="print the markdown results of JSONs written "
                        "before, their results in order, the first one's environment (with --docs, write them into that "
                        "file instead)")
    parser.add_argument("--docs", help="markdown file whose results block a full CPU run (or --markdown) rewrites "
                        "(make bench: docs/BENCHMARKS.md)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.markdown:
        saved = merge([json.loads(Path(f).read_text()) for f in args.markdown])
        write_docs(saved, args.docs) if args.docs else print(markdown(saved))
        return 0
    if args.worker:
        _worker_main(json.loads(args.worker))
        return 0
    if args.torch and not args.gpu:
        try:
            import importlib.util

            args.torch = importlib.util.find_spec("torch") is not None
        except ImportError:
            args.torch = False
        if not args.torch:
            print("torch is not installed: skipping the PyTorch comparison (pip install torch==2.13.0)", flush=True)
    specs = plan_gpu(args) if args.gpu else plan(args)
    env = environment()
    print(f"{env.get('cpu')} | {env['cores']} cores | jax {env['jax']} | torch {env['torch']} | {env['date']}", flush=True)
    results = []
    start = time.perf_counter()
    for spec in specs:
        print(f"-- {spec['name']} (load {_load()})", flush=True)
        result = run_worker(spec)
        results.append(result)
        _write(args.out, env, args, results, start)  # after every measurement: a killed run keeps what it measured
        if "error" in result:
            print(f"   ERROR: {result['error']}", flush=True)
        else:
            keys = ("compile_s", "images_per_s", "eval_images_per_s", "step_peak_rss_gib",
                    "loader_images_per_s", "loader_augment_images_per_s", "mfu")
            print("   " + ", ".join(f"{k}={result[k]:.3g}" for k in keys if result.get(k) is not None)
                  + (f", step_s={result['step_s']}" if "step_s" in result else ""), flush=True)
    out = _write(args.out, env, args, results, start)
    summary = out["summary"]
    print()
    print(gpu_table(results) if args.gpu else table(results))
    print()
    print(json.dumps(summary, indent=2))
    print(f"wrote {args.out} ({out['total_wall_s']:.0f} s)")
    if args.docs and not (args.quick or args.only):
        write_docs(out, args.docs)
        print(f"updated the results in {args.docs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
