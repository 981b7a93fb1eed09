"""The accuracy study: a plan of (experiment, seed) runs trained one after another, resumably.

``python -m stepjax.study [--plan cpu] [--root runs/study]`` trains every run of the plan that is
not finished yet (each in ``<root>/<experiment>_s<seed>``, resuming from its checkpoints) and
evaluates each finished run with flip test-time augmentation (`stepjax.evaluate`); then
``python -m stepjax.results`` turns the run directories into docs/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
from pathlib import Path

SEEDS = (0, 1, 2)
PLANS = {
    # 3 seeds of plain, SE and StepNet; one seed of the StepNet ablation, CBAM and DIA
    "cpu": [(f"cifar10_{c}:cpu", s) for s in SEEDS for c in ("resnet", "se", "stepnet")]
    + [(f"cifar10_{c}:cpu", 0) for c in ("stepnet_nohistory", "cbam", "dia")],
    # the deep protocol (ResNet-164 topology): seed 0 of plain, SE and StepNet first, then seeds 1, 2
    "deep": [(f"cifar10_{c}:deep", s) for s in SEEDS for c in ("resnet", "se", "stepnet")],
}
ROOTS = {"cpu": "runs/study", "deep": "runs/deep"}  # run directories; records go to results/<same>


def run_dir(root: Path, exp: str, seed: int) -> Path:
    return Path(root) / f"{exp.replace(':', '_')}_s{seed}"


def finished_steps(workdir: Path) -> int | None:
    """The step count of a finished run, None while it is not finished."""
    summary = workdir / "summary.json"
    saved = json.loads(summary.read_text()) if summary.exists() else {}
    return saved.get("steps") if saved.get("status") == "done" else None


def protocol_mismatch(exp: str, workdir: Path) -> str | None:
    """Why a finished run cannot count for `exp` (trained under another protocol), or None."""
    from stepjax.config import load_experiment, read_run_config
    from stepjax.results import protocol

    current, saved = protocol(load_experiment(exp).to_dict()), protocol(read_run_config(workdir).to_dict())
    if saved == current:
        return None
    return (f"{workdir} is a finished run trained under another protocol than {exp}'s current one:\n"
            f"  run: {saved}\n  now: {current}\nMove it aside (e.g. to another root, reported apart) or "
            "pass another --root; nothing was trained.")


def command(exp: str, seed: int, workdir: Path) -> str:
    """The shell command that trains (or resumes) one run of the plan."""
    return f"python -m stepjax.main --config {exp} --workdir {shlex.quote(str(workdir))} seed={seed}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--plan", default="cpu", choices=sorted(PLANS))
    parser.add_argument("--root", help="run directories (default runs/study for cpu, runs/deep for deep)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands of pending runs")
    args = parser.parse_args(argv)
    args.root = args.root or ROOTS.get(args.plan, f"runs/{args.plan}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from stepjax import parallel
    from stepjax.evaluate import evaluate_run, read_evaluation
    from stepjax.main import main as train_main
    from stepjax.records import file_run

    parallel.configure_cpu_devices()
    runs = [(exp, seed, run_dir(args.root, exp, seed)) for exp, seed in PLANS[args.plan]]
    stale = [why for exp, _, d in runs if finished_steps(d) is not None and (why := protocol_mismatch(exp, d))]
    if stale:
        print("\n".join(stale), file=sys.stderr)
        return 2
    for exp, seed, workdir in runs:
        if finished_steps(workdir) is None:
            print(command(exp, seed, workdir), flush=True)
            if args.dry_run:
                continue
            code = train_main(shlex.split(command(exp, seed, workdir))[3:])
            if code:
                return code
        if not args.dry_run and read_evaluation(workdir, finished_steps(workdir)) is None:
            result = evaluate_run(workdir)
            print(f"{workdir}: test accuracy {100 * result['accuracy']:.2f} %, with flip TTA "
                  f"{100 * result['flip_accuracy']:.2f} %; record filed in {file_run(workdir)}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
