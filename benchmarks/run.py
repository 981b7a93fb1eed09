"""`make bench`: speed, compile time and memory of the real training step, on this machine.

    python -m benchmarks.run [--quick] [--out FILE] [--devices N] [--compile-rounds N] [--no-torch] [--only NAME ...]
    python -m benchmarks.run --gpu [--out FILE]        # accelerator figures (fp32/bf16, batch 128/1024; SE, StepNet)

Every measurement runs in a fresh subprocess, so that compile times are cold and the peak memory
(`ru_maxrss`, and the resident high-water mark of the steady-state steps alone) belongs to one
configuration. The training step is `stepjax.train.step.make_train_step`, built as
`stepjax.train.loop.train` builds it (augmentation, normalisation, forward, backward, SGD with
momentum and weight decay, donated state), fed a real CIFAR-10 batch from the npz copy.

The parent prints a table and writes JSON (`default_out`: ``benchmarks/results/latest.json`` for
a full CPU run, ``gpu.json`` with ``--gpu``, ``partial.json`` with ``--quick`` or ``--only``, so
that a partial run never replaces the full record); the load average of the machine is recorded
next to every figure, because other jobs may share it.
Every worker runs with the glibc malloc settings of a tuned run (`benchmarks.measure.MALLOC`).

This module plans the measurements and runs them; `benchmarks.workers` holds the measurements,
`benchmarks.measure` what they share, `benchmarks.flops` the FLOP counts, `benchmarks.report` the
ratios, targets and markdown; `benchmarks.op_profile` is the per-operation profile (not named
`profile`: run.py runs as a script, and that name would hide the standard library's module).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

if __name__ == "__main__":  # a worker started as a script: this checkout's benchmarks package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.measure import CPU_PROTOCOL, DEFAULT_DATA, MALLOC, MODEL_VARIANTS, ROOT, controller_exp, load
from benchmarks.report import COMPILE_PRESETS, environment, gpu_table, markdown, merge, table, write_docs, write_results
from benchmarks.workers import worker_main


def run_worker(spec):
    """Run one measurement in a fresh interpreter; its result dict (or an error entry). It may
    take ``spec["timeout"]`` seconds (default 20 minutes)."""
    timeout = spec.get("timeout", 1200)
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.update(MALLOC)  # the same tuned malloc for both frameworks
    first = [spec["src"], str(ROOT)] if spec.get("src") else [str(ROOT)]
    env["PYTHONPATH"] = os.pathsep.join(first + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    t = time.perf_counter()
    load_before = load()
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
        specs.append({**common, "kind": "train", "name": f"resnet164/{c}", "exp": controller_exp(c),
                      "warmup": warm, "repeats": reps if c == "resnet" else min(reps, 2), "eval": not quick,
                      "eval_repeats": 2 if c == "resnet" else 1})
    if not quick and args.devices is None:  # what one device per core buys, same run
        specs.append({**common, "devices": 1, "kind": "train", "name": "resnet164/resnet (1 device)",
                      "exp": "cifar10_resnet", "warmup": warm, "repeats": reps, "eval": False})
    specs.append({**common, "kind": "train", "name": "resnet20/resnet (cpu protocol)", "exp": CPU_PROTOCOL,
                  "warmup": 2, "repeats": 5 if quick else 10, "eval": True})
    specs.append({**common, "kind": "train", "name": "resnet20/resnet (batch 128)", "exp": CPU_PROTOCOL,
                  "overrides": ["train.global_batch=128"], "warmup": 2, "repeats": 5 if quick else 10, "eval": False})
    # compile times in turn, round by round, each in a fresh process: ResNet-164 against ResNet-56 and
    # ResNet-110 (basic blocks, 9 and 18 a stage: what depth alone costs to compile)
    for i in range(1 if quick else args.compile_rounds):
        for preset in COMPILE_PRESETS:
            specs.append({**common, "kind": "train", "name": f"{preset}/resnet (compile, round {i + 1})",
                          "exp": "cifar10_resnet", "overrides": [f"model.preset='{preset}'"], "compile_only": True})
    specs.append({**common, "kind": "pipeline", "name": "input pipeline", "exp": "cifar10_resnet",
                  "batches": 40 if quick else 150})
    if not quick:
        # [name, experiment, convolution path, overrides]
        configs = [[f"resnet164/{c}", controller_exp(c), "auto", []] for c in MODEL_VARIANTS]
        configs += [["resnet164/resnet (XLA convolutions)", "cifar10_resnet", "xla", []],
                    ["resnet20/resnet (cpu protocol)", CPU_PROTOCOL, "auto", []]]
        if args.devices is None:  # one device with all the cores for oneDNN against one device per core
            configs += [[f"{name} (1 device)", exp, "auto", ["mesh.num_devices=1"]]
                        for name, exp, _, _ in (configs[0], configs[-1])]
        specs.append({**common, "kind": "interleaved", "name": "interleaved", "configs": configs,
                      "rounds": args.rounds, "torch": args.torch, "torch_compile": args.torch_compile,
                      "timeout": 4 * 3600})  # 12 steps a round: at load 8 it took more than 20 minutes
    if args.torch and not quick:
        specs.append({"kind": "torch", "name": "pytorch resnet164", "depths": [18, 18, 18], "batch": 128,
                      "warmup": warm, "repeats": reps, "channels_last": True})
    return specs


def plan_gpu(args):
    """Plain ResNet-164 in fp32 and bf16 at batch 128 and 1024, then SE and StepNet (fp32, batch 128)."""
    configs = [("resnet", dtype, batch) for dtype in ("float32", "bfloat16") for batch in (128, 1024)]
    configs += [(c, "float32", 128) for c in ("se", "stepnet")]
    specs = [{"kind": "gpu", "name": f"gpu {c}/{dtype}/b{batch}", "exp": controller_exp(c),
              "data_dir": args.data_dir, "dtype": dtype, "warmup": 3, "repeats": 20,
              "overrides": [f"model.dtype='{dtype}'", f"train.global_batch={batch}", "train.eval_batch=1000"]}
             for c, dtype, batch in configs]
    return specs


def default_out(args) -> Path:
    """Where the JSON goes without ``--out``: a partial or GPU run never replaces the full CPU record."""
    name = "gpu.json" if args.gpu else "partial.json" if (args.quick or args.only) else "latest.json"
    return ROOT / "benchmarks" / "results" / name


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="plain ResNet-164 only, fewer repeats, no evaluation of it, no PyTorch (< 3 min)")
    parser.add_argument("--out", help="JSON output file (default benchmarks/results/latest.json for a full CPU run, "
                        "gpu.json with --gpu, partial.json with --quick or --only)")
    parser.add_argument("--devices", type=int, default=None,
                        help="CPU devices (default: one per core, see stepjax.parallel.configure_cpu_devices)")
    parser.add_argument("--repeats", type=int, default=3, help="timed ResNet-164 training steps per configuration")
    parser.add_argument("--compile-rounds", type=int, default=3,
                        help="rounds of cold compiles of ResNet-164, -56 and -110 in turn, for the compile ratios")
    parser.add_argument("--rounds", type=int, default=5,
                        help="rounds of the interleaved same-time comparison (all controllers and PyTorch; "
                        "3 until 2026-12-03)")
    parser.add_argument("--data-dir", default=DEFAULT_DATA, help="directory with train.npz / test.npz")
    parser.add_argument("--no-torch", dest="torch", action="store_false", help="skip the PyTorch comparison")
    parser.add_argument("--no-torch-compile", dest="torch_compile", action="store_false",
                        help="skip the torch.compile row (its compilation takes minutes on 2 cores)")
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
        worker_main(json.loads(args.worker))
        return 0
    if args.torch and not args.gpu:
        try:
            import importlib.util

            args.torch = importlib.util.find_spec("torch") is not None
        except ImportError:
            args.torch = False
        if not args.torch:
            print("torch is not installed: skipping the PyTorch comparison (pip install torch==2.13.0)", flush=True)
    every = plan_gpu(args) if args.gpu else plan(args)
    specs = [s for s in every if not args.only or any(o in s["name"] for o in args.only)]
    if not specs:
        print(f"benchmarks.run: --only {' '.join(args.only)} matches no measurement; their names: "
              f"{', '.join(repr(s['name']) for s in every)}.", file=sys.stderr)
        return 2
    args.out = args.out or str(default_out(args))
    env = environment()
    print(f"{env.get('cpu')} | {env['cores']} cores | jax {env['jax']} | torch {env['torch']} | {env['date']}", flush=True)
    results = []
    start = time.perf_counter()
    for spec in specs:
        print(f"-- {spec['name']} (load {load()})", flush=True)
        result = run_worker(spec)
        results.append(result)
        write_results(args.out, env, args, results, start)  # after every measurement: a killed run keeps what it measured
        if "error" in result:
            print(f"   ERROR: {result['error']}", flush=True)
        else:
            keys = ("compile_s", "images_per_s", "eval_images_per_s", "step_peak_rss_gib",
                    "loader_images_per_s", "loader_augment_images_per_s", "mfu")
            print("   " + ", ".join(f"{k}={result[k]:.3g}" for k in keys if result.get(k) is not None)
                  + (f", step_s={result['step_s']}" if "step_s" in result else ""), flush=True)
    out = write_results(args.out, env, args, results, start)
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
