"""The accuracy study: a plan of (experiment, seed) runs trained one after another, resumably.

``python -m stepjax.study [--plan cpu] [--root runs/study]`` trains every run of the plan that is
not finished yet (each in ``<root>/<experiment>_s<seed>``, resuming from its checkpoints), then
``python -m stepjax.results`` turns the run directories into docs/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
from pathlib import Path

SEEDS = (0, 1, 2)
PLANS = {
    # 3 seeds of plain, SE and StepNet; one seed of the StepNet ablation, CBAM and DIA
    "cpu": [(f"cifar10_{c}:cpu", s) for s in SEEDS for c in ("resnet", "se", "stepnet")]
    + [(f"cifar10_{c}:cpu", 0) for c in ("stepnet_nohistory", "cbam", "dia")],
}


def run_dir(root: Path, exp: str, seed: int) -> Path:
    return Path(root) / f"{exp.replace(':', '_')}_s{seed}"


def is_done(workdir: Path) -> bool:
    summary = workdir / "summary.json"
    return summary.exists() and json.loads(summary.read_text()).get("status") == "done"


def command(exp: str, seed: int, workdir: Path) -> str:
    """The shell command that trains (or resumes) one run of the plan."""
    return f"python -m stepjax.main --config {exp} --workdir {shlex.quote(str(workdir))} seed={seed}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--plan", default="cpu", choices=sorted(PLANS))
    parser.add_argument("--root", default="runs/study")
    parser.add_argument("--dry-run", action="store_true", help="print the commands of pending runs")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from stepjax.main import main as train_main

    for exp, seed in PLANS[args.plan]:
        workdir = run_dir(args.root, exp, seed)
        if is_done(workdir):
            continue
        print(command(exp, seed, workdir), flush=True)
        if not args.dry_run:
            code = train_main(shlex.split(command(exp, seed, workdir))[3:])
            if code:
                return code
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
