"""The campaign's `measure` item: how near its limit the accelerator step runs, in one command.

Each measurement (`SPECS`, in priority order) is one worker process (``python -m
stepjax.campaign.measure --worker SPEC``) that builds the real training step
(`stepjax.train.step.train_step_fn`: augmentation, forward, backward, SGD) of an experiment with
overrides, on a synthetic batch (only the speed is measured, so no data need be staged), compiles
it and runs a few steps. Workers start in batches of `BATCH` that compile side by side; then each
measurement of the batch is timed alone, in turn (the ``copies`` of a side-by-side measurement
together), so that no compile shares the machine with a timing. A measurement gives its compile
time, the median of `SYNC_STEPS` step times each waited for, and the images per second of steps
dispatched back to back for `SECONDS` (summed over the copies; per member and in all with
``members``, the seeds vmapped in one program). `RATIOS` compares them; `TARGETS` are the issue's.

What is compared: bfloat16 against float32; the stages unrolled (``model.scan=False``) against
the scan; XLA's command buffers (CUDA graphs) switched off, and widened to the loops, against the
default; 3 trainings side by side against one; 2-4 seeds vmapped in one program against one.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

BATCH = 6  # workers compiling side by side (16 cores; each holds a GPU context)
SYNC_STEPS = 10
SECONDS = 4.0
WARMUP_STEPS = 3
COMPILE_LIMIT_S = 180.0  # a worker not ready by then is stopped and reported (unrolled stages compile long)
BATCH_EST_S = 120.0  # a batch is started only with this much time left
CMDBUF_OFF = "--xla_gpu_enable_command_buffer="
CMDBUF_LOOPS = "--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL"
BF16 = "model.dtype='bfloat16'"


@dataclasses.dataclass(frozen=True)
class Timing:
    """How long to time each measurement (`seconds`), the time a batch is started with at least
    (`batch_est_s`), and how long its workers may take to compile (`compile_limit_s`)."""

    seconds: float = SECONDS
    batch_est_s: float = BATCH_EST_S
    compile_limit_s: float = COMPILE_LIMIT_S


def spec(name, exp, *overrides, xla_flags="", copies=1, members=0, env=()):
    """One measurement: `exp` with `overrides`; `copies` processes side by side; `members` seeds vmapped."""
    return {"name": name, "exp": exp, "overrides": list(overrides), "xla_flags": xla_flags, "copies": copies,
            "members": members, "env": list(env)}


SPECS = [
    spec("gpu protocol plain (bf16 b256)", "cifar10_resnet:gpu"),
    spec("gpu protocol se (bf16 b256)", "cifar10_se:gpu"),
    spec("gpu protocol stepnet (bf16 b256)", "cifar10_stepnet:gpu"),
    spec("plain fp32 b128", "cifar10_resnet"),
    spec("plain bf16 b128", "cifar10_resnet", BF16),
    spec("plain bf16 b128 unrolled", "cifar10_resnet", BF16, "model.scan=False"),
    spec("stepnet bf16 b128", "cifar10_stepnet", BF16),
    spec("stepnet bf16 b128 unrolled", "cifar10_stepnet", BF16, "model.scan=False"),
    spec("plain bf16 b128 command buffers off", "cifar10_resnet", BF16, xla_flags=CMDBUF_OFF),
    spec("plain bf16 b128 command buffers with loops", "cifar10_resnet", BF16, xla_flags=CMDBUF_LOOPS),
    spec("gpu protocol plain x3 side by side", "cifar10_resnet:gpu", copies=3),
    spec("plain bf16 b128 2 seeds vmapped", "cifar10_resnet", BF16, members=2),
    spec("resnet20 cpu protocol (fp32 b32)", "cifar10_resnet:cpu", env=["JAX_DEFAULT_MATMUL_PRECISION=highest"]),
    spec("resnet20 cpu protocol x3 side by side", "cifar10_resnet:cpu", copies=3, env=["JAX_DEFAULT_MATMUL_PRECISION=highest"]),
    spec("resnet20 cpu protocol 4 seeds vmapped", "cifar10_resnet:cpu", members=4, env=["JAX_DEFAULT_MATMUL_PRECISION=highest"]),
    spec("stepnet fp32 b128", "cifar10_stepnet"),
    spec("se fp32 b128", "cifar10_se"),
]
# (name, numerator, denominator): images/s of the first over the second (per member for vmapped ones)
RATIOS = [
    ("stepnet cost, gpu protocol (plain / stepnet images/s)", "gpu protocol plain (bf16 b256)", "gpu protocol stepnet (bf16 b256)"),
    ("se cost, gpu protocol", "gpu protocol plain (bf16 b256)", "gpu protocol se (bf16 b256)"),
    ("bf16 gain at b128", "plain bf16 b128", "plain fp32 b128"),
    ("unrolled gain, plain bf16 b128", "plain bf16 b128 unrolled", "plain bf16 b128"),
    ("unrolled gain, stepnet bf16 b128", "stepnet bf16 b128 unrolled", "stepnet bf16 b128"),
    ("command buffers off, plain bf16 b128", "plain bf16 b128 command buffers off", "plain bf16 b128"),
    ("command buffers with loops, plain bf16 b128", "plain bf16 b128 command buffers with loops", "plain bf16 b128"),
    ("3 side by side, all together against one (gpu protocol plain)", "gpu protocol plain x3 side by side", "gpu protocol plain (bf16 b256)"),
    ("2 seeds vmapped, per seed against one (plain bf16 b128)", "plain bf16 b128 2 seeds vmapped", "plain bf16 b128"),
    ("3 side by side, all together against one (resnet20)", "resnet20 cpu protocol x3 side by side", "resnet20 cpu protocol (fp32 b32)"),
    ("4 seeds vmapped, per seed against one (resnet20)", "resnet20 cpu protocol 4 seeds vmapped", "resnet20 cpu protocol (fp32 b32)"),
    ("stepnet cost, fp32 b128 (paper protocol)", "plain fp32 b128", "stepnet fp32 b128"),
]
BASELINE_IMAGES_S = 5205  # plain ResNet-164, fp32, batch 128, H200 (docs/BENCHMARKS.md, 2026-11-26)


# ----------------------------------------------------------------------------------------------
# the worker (one process, one measurement)
# ----------------------------------------------------------------------------------------------


def build_step(exp: str, overrides: list[str], members: int):
    """The jitted training step of `exp` on a synthetic batch: ``(step, state, batch, images per step)``;
    with `members`, that many seeds stacked and vmapped in one program."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from stepjax import data
    from stepjax.config import apply_overrides, load_experiment
    from stepjax.models import build_model
    from stepjax.train import init_state, make_optimizer, train_step_fn
    from stepjax.train.step import learning_rate_schedule

    config = apply_overrides(load_experiment(exp), overrides)
    info = data.dataset_info(config.data)
    size = config.train.global_batch
    schedule = learning_rate_schedule(config.optim, 390, 390 * config.train.epochs)
    tx = make_optimizer(config.optim, schedule)
    states = []
    for seed in range(max(members, 1)):
        config.seed = seed
        graphdef, state = init_state(build_model(config), tx)
        states.append(state)
    rng = np.random.default_rng(0)
    batch = {"image": jnp.asarray(rng.integers(0, 256, (size, *info.image_shape), dtype=np.uint8)),
             "label": jnp.asarray(rng.integers(0, info.num_classes, size, dtype=np.int32))}
    step = train_step_fn(graphdef, tx, schedule, config, info)
    if not members:
        return jax.jit(step, donate_argnums=0), states[0], batch, size
    stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *states)
    batch = jax.tree.map(lambda a: jnp.stack([a] * members), batch)
    return jax.jit(jax.vmap(step), donate_argnums=0), stacked, batch, size * members


def time_step(compiled, state, batch, seconds: float):
    """(median seconds of a waited-for step, steps per second dispatched back to back, state)."""
    import jax

    times = []
    for _ in range(SYNC_STEPS):
        t = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t)
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(10):
            state, metrics = compiled(state, batch)
        steps += 10
        jax.block_until_ready(metrics)
    return sorted(times)[len(times) // 2], steps / (time.perf_counter() - start), state


def worker(task: dict, sync: Path, seconds: float) -> dict:
    """Compile, warm up, say ready (``<sync>/<id>.ready``), wait for ``<sync>/<id>.go``, time."""
    import jax

    t0 = time.perf_counter()
    step, state, batch, images = build_step(task["exp"], task["overrides"], task["members"])
    t1 = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    t2 = time.perf_counter()
    for _ in range(WARMUP_STEPS):
        state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    (sync / f"{task['id']}.ready").write_text("")
    while not (sync / f"{task['id']}.go").exists():
        time.sleep(0.02)
    step_s, steps_per_s, state = time_step(compiled, state, batch, seconds)
    device = jax.devices()[0]
    stats = device.memory_stats() or {}
    return {"build_s": t1 - t0, "compile_s": t2 - t1, "step_ms": 1000 * step_s, "images_per_s": images * steps_per_s,
            "device": device.device_kind, "peak_gib": stats.get("peak_bytes_in_use", 0) / 2**30}


# ----------------------------------------------------------------------------------------------
# the parent
# ----------------------------------------------------------------------------------------------


def _launch(task: dict, sync: Path, env: dict, seconds: float) -> subprocess.Popen:
    child = dict(env)
    child.update(dict(pair.split("=", 1) for pair in task["env"]))
    if task["xla_flags"]:
        child["XLA_FLAGS"] = f"{child.get('XLA_FLAGS', '')} {task['xla_flags']}".strip()
    argv = [sys.executable, "-m", "stepjax.campaign.measure", "--worker", json.dumps(task), "--sync", str(sync),
            "--seconds", str(seconds)]
    log = open(sync / f"{task['id']}.log", "w")
    return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=child)


def _result(task: dict, process: subprocess.Popen, sync: Path) -> dict:
    lines = (sync / f"{task['id']}.log").read_text(errors="replace").splitlines()
    found = [json.loads(line[len("MEASURE_RESULT "):]) for line in lines if line.startswith("MEASURE_RESULT ")]
    if found:
        return found[0]
    return {"error": "\n".join(lines[-12:]) or f"exit {process.returncode}"}


def _wait_ready(tasks: list[dict], processes: list, sync: Path, limit: float) -> None:
    while time.monotonic() < limit:
        if all((sync / f"{t['id']}.ready").exists() or p.poll() is not None for t, p in zip(tasks, processes)):
            return
        time.sleep(0.2)


def run_batch(specs: list[dict], sync: Path, env: dict, timing: Timing, deadline: float) -> list[dict]:
    """Compile the `specs` side by side, stop the workers not ready in time, then time each
    measurement alone (its copies together)."""
    tasks = [{**s, "id": f"{s['index']}_{c}"} for s in specs for c in range(s["copies"])]
    share = 0.9 / len(tasks)
    processes = [_launch(t, sync, {**env, "XLA_PYTHON_CLIENT_MEM_FRACTION": f"{share:.3f}"}, timing.seconds) for t in tasks]
    _wait_ready(tasks, processes, sync, min(time.monotonic() + timing.compile_limit_s, deadline))
    ready = {t["id"] for t, p in zip(tasks, processes) if (sync / f"{t['id']}.ready").exists() and p.poll() is None}
    for t, p in zip(tasks, processes):
        if t["id"] not in ready:  # no compile may share the machine with a timing
            p.kill()
            p.wait()
    results = []
    for s in specs:
        group = [(t, p) for t, p in zip(tasks, processes) if t["index"] == s["index"]]
        for t, _ in group:
            if t["id"] in ready:
                (sync / f"{t['id']}.go").write_text("")
        for _, p in group:
            try:
                p.wait(timeout=timing.seconds * 4 + 30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        parts = [_result(t, p, sync) if t["id"] in ready else
                 {"error": f"not compiled within {timing.compile_limit_s:.0f} s, or failed: " + _result(t, p, sync)["error"]}
                 for t, p in group]
        results.append(_combine(s, parts))
    return results


def _combine(s: dict, parts: list[dict]) -> dict:
    """One measurement from its copies: images/s summed; per member with vmapped seeds."""
    out = {k: s[k] for k in ("name", "exp", "overrides", "xla_flags", "copies", "members", "env")}
    errors = [p["error"] for p in parts if "error" in p]
    if errors:
        return {**out, "error": errors[0]}
    total = sum(p["images_per_s"] for p in parts)
    out.update({k: parts[0][k] for k in ("build_s", "compile_s", "step_ms", "device", "peak_gib")},
               images_per_s=total, per_copy_images_per_s=[p["images_per_s"] for p in parts])
    if s["members"]:
        out["per_member_images_per_s"] = total / s["members"]
    return out


def rate(result: dict | None) -> float | None:
    """Images/s of a measurement, per member for vmapped seeds (what one run gets)."""
    if not result or "error" in result:
        return None
    return result.get("per_member_images_per_s", result["images_per_s"])


def derived(results: list[dict]) -> dict:
    """`RATIOS` and `TARGETS` from the measurements (None where one side is missing)."""
    by_name = {r["name"]: r for r in results}
    ratios = {}
    for name, top, bottom in RATIOS:
        a, b = rate(by_name.get(top)), rate(by_name.get(bottom))
        ratios[name] = a / b if a and b else None
    # plain ResNet-164 at batch 128 (the paper protocol's experiment), any setting, one process
    plain = [rate(r) for r in results if r["exp"] == "cifar10_resnet" and r["copies"] == 1 and rate(r)]
    fastest = max(plain, default=None)
    stepnet = ratios["stepnet cost, gpu protocol (plain / stepnet images/s)"]
    targets = {"plain ResNet-164 b128 >= 2x 5,205 images/s (fastest setting)":
               None if fastest is None else {"images_per_s": fastest, "met": fastest >= 2 * BASELINE_IMAGES_S},
               "StepNet <= 1.25x plain (gpu protocol)": None if stepnet is None else {"cost": stepnet, "met": stepnet <= 1.25}}
    return {"ratios": ratios, "targets": targets}


def run_measure(out: str | Path, deadline: float, env: dict, specs: list[dict] | None = None,
                timing: Timing = Timing()) -> dict:
    """Run the measurements (default `SPECS`) in batches, each started only with
    `Timing.batch_est_s` left before `deadline` (``time.monotonic()``); write the figures and
    `derived` to `out` (JSON).

    **Returns:**

    ``{"measured": n, "planned": m, "file": out}``.
    """
    queue = [{**s, "index": i} for i, s in enumerate(specs if specs is not None else SPECS)]
    planned = len(queue)
    sync = Path(out).parent / "measure-sync"
    sync.mkdir(parents=True, exist_ok=True)
    results, start = [], time.monotonic()
    while queue and deadline - time.monotonic() >= timing.batch_est_s:
        batch = [queue.pop(0)]
        while queue and sum(s["copies"] for s in batch) + queue[0]["copies"] <= BATCH:
            batch.append(queue.pop(0))
        results += run_batch(batch, sync, env, timing, deadline)
    report = {"note": "one worker process per measurement, synthetic batches, each timed alone after the batch "
              "compiled side by side (stepjax.campaign.measure)", "wall_s": time.monotonic() - start,
              "results": results, "not_measured_for_time": [s["name"] for s in queue], **derived(results)}
    Path(out).write_text(json.dumps(report, indent=1))
    return {"measured": sum("error" not in r for r in results), "planned": planned, "file": str(out)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--worker", required=True, help="one measurement (JSON), as the parent writes it")
    parser.add_argument("--sync", required=True)
    parser.add_argument("--seconds", type=float, default=SECONDS)
    args = parser.parse_args(argv)
    result = worker(json.loads(args.worker), Path(args.sync), args.seconds)
    print("MEASURE_RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
