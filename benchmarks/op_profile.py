"""Where the time of one ResNet-164 training step goes: JAX (XLA's convolutions and oneDNN's) and
PyTorch side by side, per kind of operation (docs/BENCHMARKS.md).

    python -m benchmarks.op_profile [--steps 2] [--out benchmarks/results/profile.json]

One process, the batch of 128 over the CPU devices (one per core) for JAX, PyTorch eager with
its default threads (one per core), `channels_last`. JAX: `jax.profiler.trace` of `--steps` steps
after a warm-up; every executed HLO instruction is put in a category from the compiled module
(its opcode, custom-call target and the `op_name` of its source: ``transpose(jvp(...))`` is the
backward pass); times are summed and divided by the devices (they run at the same time) and the
steps. PyTorch: `torch.profiler` self CPU time of each ATen operation, by name.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from benchmarks.measure import DEFAULT_DATA, ROOT, build_step, load

ROWS = ("conv forward", "conv input gradient", "conv kernel gradient", "conv gradients (input + kernel)",
        "other ops, forward", "other ops, backward", "augmentation, loss, optimizer, copies",
        "all-reduce (incl. waiting for the other device)")
_ONEDNN = {"forward": "conv forward", "input_grad": "conv input gradient", "kernel_grad": "conv kernel gradient"}
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%(\S+) = .*? (\S+?)\(")


def hlo_categories(hlo: str) -> dict:
    """``{instruction name: category}`` of a compiled HLO module's text."""
    out = {}
    for line in hlo.splitlines():
        m = _INSTRUCTION.match(line)
        if not m:
            continue
        name, opcode = m.groups()
        op_name = (re.search(r'op_name="([^"]*)"', line) or [None, ""])[1]
        target = re.search(r'custom_call_target="stepjax_onednn_conv_(\w+)"', line)
        backward = "transpose(" in op_name
        if target:
            out[name] = _ONEDNN[target[1]]
        elif opcode.startswith("all-reduce"):
            out[name] = ROWS[-1]
        elif opcode in ("convolution", "dot") or op_name.endswith(("conv_general_dilated", "dot_general")):
            out[name] = "conv gradients (input + kernel)" if backward else "conv forward"
        elif backward:
            out[name] = "other ops, backward"
        else:
            out[name] = "other ops, forward" if "jvp(" in op_name else "augmentation, loss, optimizer, copies"
    return out


def jax_profile(path: str, steps: int, data_dir: str) -> dict:
    """Milliseconds per step and category of the JAX step on convolution path `path`."""
    import jax
    from jax.profiler import ProfileData

    os.environ["STEPJAX_CONV"] = path
    compiled, state, batch, _ = build_step("cifar10_resnet", (), data_dir)
    categories = hlo_categories(compiled.as_text())
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    trace_dir = tempfile.mkdtemp(prefix="stepjax-profile-")
    t = time.perf_counter()
    with jax.profiler.trace(trace_dir):
        for _ in range(steps):
            state, metrics = compiled(state, batch)
            jax.block_until_ready(metrics)
    wall = (time.perf_counter() - t) / steps
    data = ProfileData.from_file(glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True)[0])
    ms = defaultdict(float)
    for plane in data.planes:
        for line in plane.lines:
            if "PjRtCpuClient" not in line.name and "XLAEigen" not in line.name:
                continue
            for event in line.events:
                if event.name in categories:
                    ms[categories[event.name]] += event.duration_ns / 1e6
    scale = steps * jax.device_count()
    return {"ms": {k: v / scale for k, v in ms.items()}, "wall_ms": 1e3 * wall, "devices": jax.device_count()}


def _torch_category(name: str) -> str:
    if name == "aten::convolution_backward":
        return "conv gradients (input + kernel)"
    if name in ("aten::mkldnn_convolution", "aten::_convolution", "aten::convolution", "aten::conv2d"):
        return "conv forward"
    if "foreach" in name or "Optimizer" in name or "sgd" in name.lower():
        return "augmentation, loss, optimizer, copies"
    if "backward" in name.lower():
        return "other ops, backward"
    if any(k in name for k in ("batch_norm", "relu", "aten::add", "clamp_min")):
        return "other ops, forward"
    return "augmentation, loss, optimizer, copies"


def torch_profile(steps: int) -> dict:
    """Milliseconds per step and category of PyTorch's eager step (self CPU time by ATen op)."""
    import torch

    from benchmarks.torch_resnet import make_torch_step

    step = make_torch_step(depths=(18, 18, 18), batch=128)
    step()
    t = time.perf_counter()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    wall = (time.perf_counter() - t) / steps
    ms = defaultdict(float)
    for event in prof.key_averages():
        if event.key.startswith(("aten::", "Optimizer")) or "Backward" in event.key:
            ms[_torch_category(event.key)] += event.self_cpu_time_total / 1e3
    return {"ms": {k: v / steps for k, v in ms.items()}, "wall_ms": 1e3 * wall, "threads": torch.get_num_threads()}


def markdown(result: dict) -> str:
    """The side-by-side table of a profile result."""
    columns = [c for c in ("xla", "onednn", "pytorch") if c in result]
    names = {"xla": "JAX, XLA convolutions", "onednn": "JAX, oneDNN convolutions", "pytorch": "PyTorch eager"}
    rows = [f"| ms per step | {' | '.join(names[c] for c in columns)} |", "| --- |" + " --- |" * len(columns)]
    for row in (*ROWS, "sum of the above"):
        cells = []
        for c in columns:
            ms = result[c]["ms"]
            value = sum(ms.values()) if row == "sum of the above" else ms.get(row)
            cells.append("-" if value is None else f"{value:.0f}")
        rows.append(f"| {row} | {' | '.join(cells)} |")
    walls = " | ".join(f"{result[c]['wall_ms']:.0f}" for c in columns)
    rows.append(f"| wall time of a profiled step | {walls} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.op_profile", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2, help="profiled steps per framework")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "profile.json"))
    parser.add_argument("--data-dir", default=DEFAULT_DATA, help="directory with train.npz / test.npz")
    parser.add_argument("--no-torch", dest="torch", action="store_false", help="JAX only")
    args = parser.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from stepjax import parallel

    parallel.configure_cpu_devices()
    result = {"load_before": load()}
    for path in ("xla", "onednn"):
        result[path] = jax_profile(path, args.steps, args.data_dir)
    if args.torch:
        result["pytorch"] = torch_profile(args.steps)
    result["load_after"] = load()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(markdown(result))
    print(f"load average before / after: {result['load_before']} / {result['load_after']}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
