"""Stiffness analysis of a trained network:
``python -m stepjax.analysis --workdir DIR [--compare DIR2] [--num-samples N] [--out DIR]``.

`DIR` is a run directory, or ``init:EXP`` for a freshly initialised model of experiment EXP.
Writes the record ``analysis.json.gz`` (the data of every figure, gzip-compressed JSON), ``correlations.md`` and the PNGs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from stepjax import errors, parallel
from stepjax.analysis import figures
from stepjax.analysis.metrics import StatsOptions
from stepjax.analysis.report import INIT_PREFIX, analyse, build_report, write_report
from stepjax.analysis.trace import TraceOptions
from stepjax.records import results_root

DEFAULT_OUT = Path("docs/figures/analysis")
RECORDS = "analysis"  # the record (analysis.json.gz) goes to results/analysis/<name>/ (stepjax.records.results_root)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m stepjax.analysis", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, help=f"run directory, or {INIT_PREFIX}EXP for a fresh model")
    p.add_argument("--compare", help="second model overlaid on the NSI plots (run directory or init:EXP)")
    p.add_argument("--num-samples", type=int, default=1000,
                   help="size of the fixed random subset of the split (default 1000)")
    p.add_argument("--split", default="test", choices=("test", "train"))
    p.add_argument("--data-dir", help="read the images from an npz copy here (e.g. /work/shared/data/cifar10)")
    p.add_argument("--out", help=f"figure directory (default {DEFAULT_OUT}/<workdir name>); the record "
                   "its record goes to results/analysis/<its name>")
    p.add_argument("--no-controls", action="store_true", help="skip the random-init and mean-gate controls")
    p.add_argument("--power-iters", type=int, default=TraceOptions.power_iters)
    p.add_argument("--tol", type=float, default=TraceOptions.tol, help="relative local error tolerance of h*")
    p.add_argument("--eps", type=float, default=TraceOptions.eps, help="relative secant offset")
    p.add_argument("--batch-size", type=int, default=TraceOptions.batch_size)
    p.add_argument("--permutations", type=int, default=StatsOptions.num_permutations)
    p.add_argument("--bootstrap", type=int, default=StatsOptions.num_bootstrap)
    p.add_argument("--num-curves", type=int, default=50, help="per-sample curves drawn per model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--debug", action="store_true", help="show the traceback of a reported error")
    args = p.parse_args(argv)
    if args.num_samples < 2:
        p.error("--num-samples must be at least 2 (correlations across samples)")
    return args


def default_out(source: str) -> Path:
    """``docs/figures/analysis/<run directory name>`` (``init_<experiment>`` for a fresh model)."""
    name = "init_" + source[len(INIT_PREFIX):] if source.startswith(INIT_PREFIX) else Path(source).resolve().name
    return DEFAULT_OUT / name.replace(":", "_")


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    errors.setup_logging(args.debug)
    return errors.run(lambda: _analysis(args), debug=args.debug)


def _analysis(args) -> int:
    options = TraceOptions(eps=args.eps, tol=args.tol, power_iters=args.power_iters, seed=args.seed,
                           batch_size=args.batch_size)
    stats = StatsOptions(num_permutations=args.permutations, num_bootstrap=args.bootstrap, seed=args.seed)
    models = analyse(args.workdir, compare=args.compare, num_samples=args.num_samples, split=args.split,
                     data_dir=args.data_dir, controls=not args.no_controls, options=options)
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "debug")}
    report = build_report(models, stats=stats, num_curves=args.num_curves, settings=settings)
    out = Path(args.out) if args.out else default_out(args.workdir)
    paths = write_report(report, results_root() / RECORDS / out.name, out)
    for m in models:
        print(f"{m.key:12s} {100 * m.accuracy:6.2f} % of {len(m.trace.logits)} {args.split} images  {m.label}")
    print(figures.correlation_markdown(report["figures"]["correlations"]))
    print("wrote", *paths, sep="\n  ")
    return 0


if __name__ == "__main__":
    parallel.restart_with_huge_pages()  # before any work: glibc reads its tunables at start-up
    errors.exit_process(main())
