"""Command line: ``python -m stepjax.main --config EXP[:variant] [--workdir DIR] [key=value ...]``.

Re-running the same command resumes from the latest checkpoint in the workdir.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import shlex
import subprocess
import sys
from pathlib import Path

from stepjax.config import available_experiments, command_config, describe
from stepjax.records import file_run


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m stepjax.main", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="experiment: family:key=value,... (e.g. cifar10:controller=se,variant=cpu) "
                        "or an older name (e.g. cifar10_se:cpu); see --list")
    parser.add_argument("--workdir", help="run directory (default runs/<experiment>)")
    parser.add_argument("--list", action="store_true", help="list experiments and exit")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. train.epochs=10 optim.lr=0.05")
    args = parser.parse_intermixed_args(argv)
    if not args.list and not args.config:
        parser.error("--config is required (see --list)")
    return args


CODE_VERSION_ENV = "STEPJAX_CODE_VERSION"


def code_version(directory=Path(__file__).resolve().parents[1]) -> str:
    """The git commit of the code in `directory` (short hash, ``+dirty`` with uncommitted changes
    to tracked files); outside a git checkout (a copy of the tree, as a device machine gets)
    ``$STEPJAX_CODE_VERSION`` if set (the campaign runner sets the version staged with it), else
    ``unknown``."""
    def git(*args):
        return subprocess.run(["git", "-C", str(directory), *args], capture_output=True, text=True, check=True).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get(CODE_VERSION_ENV) or "unknown"
    return commit + ("+dirty" if dirty else "")


# the checkout's version when this module was loaded: a long-lived process (the study) keeps running
# the code it imported, whatever the checkout says later
LOADED_CODE = code_version()


# variables that change what a command reads or computes: kept with the command (command.txt)
RECORDED_ENV = ("STEPJAX_DATA_DIR", "JAX_DEFAULT_MATMUL_PRECISION")


def recorded_environment() -> list[str]:
    """``NAME=value`` of the set `RECORDED_ENV` variables (the data directory made absolute)."""
    values = {name: os.environ[name] for name in RECORDED_ENV if os.environ.get(name)}
    if "STEPJAX_DATA_DIR" in values:
        values["STEPJAX_DATA_DIR"] = os.path.abspath(values["STEPJAX_DATA_DIR"])
    return [f"{name}={value}" for name, value in values.items()]


def argv_used(argv):
    return sys.argv[1:] if argv is None else argv


def main(argv=None) -> int:
    args = parse_args(argv_used(argv))
    if args.list:
        for name in available_experiments():
            print(f"{name:32s} {describe(name)}")
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("absl", "jax._src.xla_bridge"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    import jax  # imported here, not at the top: keeps `--list` fast

    from stepjax import parallel
    from stepjax.analysis.placement import resolve_nsi_placement
    from stepjax.train import train

    parallel.configure_cpu_devices()  # one CPU device per core; no effect on accelerators
    parallel.initialize_distributed()
    config = resolve_nsi_placement(command_config(args.config, args.overrides))
    workdir = Path(args.workdir or f"runs/{args.config.replace(':', '_')}")
    workdir.mkdir(parents=True, exist_ok=True)
    env = recorded_environment()
    (workdir / "command.txt").write_text(shlex.join([*env, "python", "-m", "stepjax.main", *argv_used(argv)]) + "\n")
    if jax.process_index() == 0:  # one line per start: a resumed run may span code versions
        with open(workdir / "code.txt", "a") as f:
            f.write(f"{datetime.datetime.now().astimezone().isoformat(timespec='seconds')} {LOADED_CODE}\n")
    summary = train(config, workdir)
    if jax.process_index() == 0:  # the run's record, for git (results/, see stepjax.records)
        logging.getLogger("stepjax").info("Record filed in %s.", file_run(workdir))
    return 0 if summary["status"] == "done" else 3


if __name__ == "__main__":
    sys.exit(main())
