"""`python -m stepjax.odebench [--quick] [--seed N] [--out DIR] [--docs DIR] [--report-only]`."""

import argparse
import dataclasses
import pathlib
import sys

from stepjax.records import results_root

from .benchmark import FULL, QUICK, run, write_records
from .report import QUICK_RECORD_DIR, regenerate


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stepjax.odebench", description="Learned step-size controller vs diffrax's PID family: train, measure, file the record, write the report.")
    parser.add_argument("--quick", action="store_true", help="few problems and tolerances; a few minutes on 2 cores")
    parser.add_argument("--out", type=pathlib.Path, default=None, help="the record: results.json and the trained controllers (default: $STEPJAX_RESULTS/odebench, i.e. results/odebench; runs/odebench_quick for --quick)")
    parser.add_argument("--docs", type=pathlib.Path, default=None, help="where ODE_BENCH_RESULTS.md and figures/odebench/ go (default: docs/, or --out for --quick)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--report-only", action="store_true", help="rebuild the page and figures from OUT/results.json alone, without solving; the record is not changed")
    args = parser.parse_args(argv)
    out = args.out or (pathlib.Path(QUICK_RECORD_DIR) if args.quick else results_root() / "odebench")
    docs = args.docs or (out if args.quick else pathlib.Path("docs"))
    log = lambda msg: print(msg, flush=True)
    if args.report_only:
        if not (out / "results.json").exists():
            print(f"stepjax.odebench: {out / 'results.json'} does not exist; run the benchmark first or pass --out DIR with a record.", file=sys.stderr)
            return 2
    else:
        config = dataclasses.replace(QUICK if args.quick else FULL, seed=args.seed)
        payload, policies = run(config, log=log)
        write_records(payload, policies, out, log=log)
    regenerate(out, docs, log=log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
