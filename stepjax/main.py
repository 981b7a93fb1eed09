"""Command line: ``python -m stepjax.main --config EXP[:variant] [--workdir DIR] [key=value ...]``.

Re-running the same command resumes from the latest checkpoint in the workdir. Exit status
(`stepjax.errors`): 0 done, 2 refused (bad input or workdir, nothing written), 3 stopped early by
SIGTERM/SIGINT with a checkpoint saved, 4 a checkpoint could not be written, 5 the loss diverged,
1 an unexpected error (with its traceback).
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
from pathlib import Path

from stepjax import errors, parallel
from stepjax.config import available_experiments, command_config, describe
from stepjax.records import file_run


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m stepjax.main", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="experiment: family:key=value,... (e.g. cifar10:controller=se,variant=cpu) "
                        "or an older name (e.g. cifar10_se:cpu); see --list")
    parser.add_argument("--workdir", help="run directory (default runs/<experiment>)")
    parser.add_argument("--list", action="store_true", help="list experiments and exit")
    parser.add_argument("--discard-record", action="store_true",
                        help="start from step 0 over a record (metrics.jsonl) that has no finished checkpoint")
    parser.add_argument("--debug", action="store_true", help="show the traceback of a reported error")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. train.epochs=10 optim.lr=0.05")
    args = parser.parse_intermixed_args(argv)
    if not args.list and not args.config:
        parser.error("--config is required (see --list)")
    return args


def argv_used(argv):
    return sys.argv[1:] if argv is None else argv


# variables that change what a command reads or computes: kept with the command (command.txt)
RECORDED_ENV = ("STEPJAX_DATA_DIR", "JAX_DEFAULT_MATMUL_PRECISION")


def recorded_environment() -> list[str]:
    """``NAME=value`` of the set `RECORDED_ENV` variables (the data directory made absolute)."""
    values = {name: os.environ[name] for name in RECORDED_ENV if os.environ.get(name)}
    if "STEPJAX_DATA_DIR" in values:
        values["STEPJAX_DATA_DIR"] = os.path.abspath(values["STEPJAX_DATA_DIR"])
    return [f"{name}={value}" for name, value in values.items()]


def main(argv=None) -> int:
    args = parse_args(argv_used(argv))
    if args.list:
        for name in available_experiments():
            print(f"{name:32s} {describe(name)}")
        return 0
    errors.setup_logging(args.debug)
    return errors.run(lambda: _train(args, argv_used(argv)), debug=args.debug)


def _train(args, argv) -> int:
    import jax

    from stepjax.models import is_nsi_placement
    from stepjax.train import train

    parallel.configure_cpu_devices()  # one CPU device per core; no effect on accelerators
    parallel.initialize_distributed()
    config = command_config(args.config, args.overrides)
    if is_nsi_placement(config.model.placement):  # the analysis is imported only then (about 1.3 s)
        from stepjax.analysis.placement import resolve_nsi_placement

        config = resolve_nsi_placement(config)
    workdir = Path(args.workdir or f"runs/{args.config.replace(':', '_')}")
    command = shlex.join([*recorded_environment(), "python", "-m", "stepjax.main", *argv])
    summary = train(config, workdir, command=command, discard_record=args.discard_record)
    if jax.process_index() == 0:  # the run's record, for git (results/, see stepjax.records)
        logging.getLogger("stepjax").info("Record filed in %s.", file_run(workdir))
    return errors.DONE if summary["status"] == "done" else errors.STOPPED


if __name__ == "__main__":
    parallel.restart_with_huge_pages()  # before any work: glibc reads its tunables at start-up
    errors.exit_process(main())
