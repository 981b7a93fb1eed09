"""The report of a benchmark run: environment, ratios against the targets, markdown tables, and the
results block of docs/BENCHMARKS.md."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import time
from pathlib import Path
from statistics import median

from benchmarks.measure import MODEL_VARIANTS, jsonable


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


# the presets whose cold compiles `make bench` takes in turn, round by round
COMPILE_PRESETS = ("resnet164", "resnet56", "resnet110")


def compile_rounds(results, preset):
    """A preset's cold compile times in seconds, round by round (its ``(compile, round i)`` rows);
    in a record from before the rounds, its one ``(compile)`` row, ResNet-164's the plain step's."""
    ok = [r for r in results if "error" not in r]
    rows = [r["compile_s"] for r in ok if r["name"].startswith(f"{preset}/resnet (compile")]
    if not rows and preset == "resnet164":
        rows = [r["compile_s"] for r in ok if r["name"] == "resnet164/resnet" and "compile_s" in r]
    return rows


def _per_round(out, key, ratios):
    """Beside a medians' ratio, how far one round's own ratio strays from it and the median of the
    rounds' ratios, which a load that drifts between rounds moves less (two rounds or more)."""
    if len(ratios) > 1:
        out["rounds_range"][key] = [min(ratios), max(ratios)]
        out["rounds_median"][key] = median(ratios)


def summarise(results):
    """Ratios and the issue's targets, from the measured entries."""
    by = {r["name"]: r for r in results if "error" not in r}
    out = {"rounds_range": {}, "rounds_median": {}}
    plain = by.get("resnet164/resnet")
    torch = by.get("pytorch resnet164")
    pipe = by.get("input pipeline")
    inter = by.get("interleaved")
    if inter:  # same-time medians: the ratios that the targets use
        steps = inter["step_s"]
        ratios = {f"step_ratio_{c}_vs_plain": (f"resnet164/{c}", "resnet164/resnet") for c in MODEL_VARIANTS[1:]}
        ratios |= {"speed_ratio_jax_vs_torch": ("pytorch resnet164", "resnet164/resnet"),
                  "speed_ratio_jax_vs_torch_compile": ("pytorch resnet164 (torch.compile)", "resnet164/resnet"),
                  "speed_ratio_onednn_vs_xla": ("resnet164/resnet (XLA convolutions)", "resnet164/resnet"),
                  "speed_ratio_resnet20_vs_torch": ("pytorch resnet20 (batch 32)", "resnet20/resnet (cpu protocol)"),
                  "speed_ratio_one_device_vs_per_core": ("resnet164/resnet", "resnet164/resnet (1 device)"),
                  "speed_ratio_resnet20_one_device_vs_per_core": ("resnet20/resnet (cpu protocol)",
                                                                 "resnet20/resnet (cpu protocol) (1 device)")}
        times = inter.get("step_times_s", {})
        for key, (slow, fast) in ratios.items():
            if slow in steps and fast in steps:
                out[key] = steps[slow] / steps[fast]
                _per_round(out, key, [a / b for a, b in zip(times.get(slow, []), times.get(fast, []))])
    elif plain:
        for c in MODEL_VARIANTS[1:]:
            if f"resnet164/{c}" in by:
                out[f"step_ratio_{c}_vs_plain"] = by[f"resnet164/{c}"]["step_s"] / plain["step_s"]
    compiles = {preset: compile_rounds(results, preset) for preset in COMPILE_PRESETS}
    if compiles["resnet164"]:
        out["compile_resnet164_s"] = median(compiles["resnet164"])
    # ResNet-110 is ResNet-56's block at twice the depth: 1.0 when the scan keeps depth out of the program
    for key, preset in (("compile_ratio_164_vs_56", "resnet164"), ("compile_ratio_110_vs_56", "resnet110")):
        if compiles[preset] and compiles["resnet56"]:
            out[key] = median(compiles[preset]) / median(compiles["resnet56"])
            _per_round(out, key, [a / b for a, b in zip(compiles[preset], compiles["resnet56"])])
    if plain and torch:
        out.setdefault("speed_ratio_jax_vs_torch", torch["step_s"] / plain["step_s"])
        out["peak_rss_ratio_jax_vs_torch"] = plain["step_peak_rss_gib"] / torch["step_peak_rss_gib"]
    if pipe and plain:
        fastest = max(r["images_per_s"] for n, r in by.items() if "images_per_s" in r and n.startswith("resnet"))
        out["pipeline_vs_fastest_step"] = pipe["loader_augment_images_per_s"] / fastest
    targets = {}
    if "speed_ratio_jax_vs_torch" in out:
        targets["resnet164 step >= pytorch"] = out["speed_ratio_jax_vs_torch"] >= 1.0
    if "speed_ratio_resnet20_vs_torch" in out:
        targets["resnet20 step (batch 32) >= pytorch"] = out["speed_ratio_resnet20_vs_torch"] >= 1.0
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
                batch = r.get("batch", {}).get(name, 128)
                rows.append(f"| {name} (interleaved, same time) | {r['devices'] if 'pytorch' not in name else '-'} | {batch} | - | "
                            f"{t:.3f} | {batch / t:.1f} | - | - | - | {r['load'][-1]} |")
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
    names = {"speed_ratio_jax_vs_torch": "ResNet-164 step speed, JAX / PyTorch eager (same time)",
             "speed_ratio_jax_vs_torch_compile": "ResNet-164 step speed, JAX / PyTorch torch.compile (same time)",
             "speed_ratio_onednn_vs_xla": "ResNet-164 step speed, oneDNN / XLA convolutions (same time)",
             "speed_ratio_resnet20_vs_torch": "ResNet-20 step speed at batch 32, JAX / PyTorch eager (same time)",
             "speed_ratio_one_device_vs_per_core": "ResNet-164 step speed, one device / one per core (same time)",
             "speed_ratio_resnet20_one_device_vs_per_core": "ResNet-20 step speed at batch 32, one device / one per core (same time)",
             "peak_rss_ratio_jax_vs_torch": "ResNet-164 step peak RSS, JAX / PyTorch",
             "compile_ratio_164_vs_56": "compile ResNet-164 / ResNet-56",
             "compile_ratio_110_vs_56": "compile ResNet-110 / ResNet-56 (same block, twice the depth)",
             "compile_resnet164_s": "compile ResNet-164 (s)",
             "pipeline_vs_fastest_step": "input pipeline (loader + augment) / fastest training step"}
    spread, paired = s.get("rounds_range", {}), s.get("rounds_median", {})

    def rounds(key):
        if key not in spread:
            return ""
        return f" (rounds {spread[key][0]:.2f}-{spread[key][1]:.2f}, their median {paired[key]:.2f})" if key in paired \
            else f" (rounds {spread[key][0]:.2f}-{spread[key][1]:.2f})"

    lines += ["| ratio | value |", "| --- | --- |"]
    for key, value in s.items():
        if key not in ("targets_met", "rounds_range", "rounds_median"):
            label = names.get(key, key.replace("step_ratio_", "step time ").replace("_vs_plain", " / plain"))
            lines.append(f"| {label} | {value:.2f}{rounds(key)} |")
    figures = {"resnet164 step >= pytorch": ("speed_ratio_jax_vs_torch", "x PyTorch's speed"),
               "resnet20 step (batch 32) >= pytorch": ("speed_ratio_resnet20_vs_torch", "x PyTorch's speed"),
               "se step <= 1.15x plain": ("step_ratio_se_vs_plain", "x plain"),
               "stepnet step <= 1.15x plain": ("step_ratio_stepnet_vs_plain", "x plain"),
               "compile 164 <= 1.5x 56 and < 30 s": ("compile_ratio_164_vs_56", "x ResNet-56"),
               "pipeline >= 3x step": ("pipeline_vs_fastest_step", "x the fastest step"),
               "peak memory <= pytorch": ("peak_rss_ratio_jax_vs_torch", "x PyTorch's")}
    lines += ["", "| target | measured | met |", "| --- | --- | --- |"]
    for k, v in s["targets_met"].items():
        key, unit = figures[k]
        lines.append(f"| {k} | {s[key]:.2f}{unit}{rounds(key)} | {'met' if v else 'MISSED'} |")
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


def write_results(path, env, args, results, start):
    out = {"environment": env, "quick": args.quick, "gpu": args.gpu, "total_wall_s": time.perf_counter() - start,
           "results": results, "summary": summarise(results)}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(out, indent=2, default=jsonable))
    return out


def merge(outs):
    """One result set from several JSONs of the same kind (e.g. a GPU session split over calls)."""
    if len({bool(o.get("gpu")) for o in outs}) > 1:
        raise SystemExit("--markdown: cannot merge CPU and GPU result files; give one kind at a time")
    results = [r for o in outs for r in o["results"]]
    return {**outs[0], "results": results, "summary": summarise(results),
            "total_wall_s": sum(o["total_wall_s"] for o in outs)}
