"""`python -m stepjax.odebench [--quick] [--out DIR] [--docs DIR] [--report-only]`."""

import argparse
import dataclasses
import json
import pathlib
import sys

from .benchmark import FULL, QUICK, rejudge, run, write_outputs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stepjax.odebench", description="Learned step-size controller vs diffrax's PID family (docs/ODE_BENCH.md, part A).")
    parser.add_argument("--quick", action="store_true", help="few problems and tolerances; a few minutes on 2 cores")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("runs/odebench"), help="results.json and trained networks (default: runs/odebench)")
    parser.add_argument("--docs", type=pathlib.Path, default=None, help="where ODE_BENCH_RESULTS.md and figures/odebench/ go (default: docs/ for a full run, --out for --quick)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--report-only", action="store_true", help="rebuild the comparisons, verdict, page and figures from OUT/results.json without solving again")
    args = parser.parse_args(argv)
    config = dataclasses.replace(QUICK if args.quick else FULL, seed=args.seed)
    docs = args.docs if args.docs is not None else (None if args.quick else pathlib.Path("docs"))
    log = lambda msg: print(msg, flush=True)
    if args.report_only:
        saved = args.out / "results.json"
        if not saved.exists():
            parser.error(f"--report-only: {saved} does not exist; run without --report-only first")
        payload = rejudge(json.loads(saved.read_text()))
    else:
        payload = run(config, out_dir=args.out, log=log)
    write_outputs(payload, out_dir=args.out, docs_dir=docs, log=log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
