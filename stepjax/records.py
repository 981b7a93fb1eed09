"""Run records: the compact, git-tracked copy of a run directory under ``results/``.

A run directory (``runs/...``) holds checkpoints and is never committed. Its *record* is the handful
of small files that every report reads (`RECORD_FILES`); training, the study and the lottery copy
it into the ``results/`` tree when a run stops, and ``python -m stepjax.records DIR ...`` (``make
records``) copies it by hand. ``runs/<path>`` is filed as ``results/<path>``; a directory outside
``runs/`` as ``results/<its name>``. The reports (``make results``) read ``results/`` only.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

RECORD_FILES = ("config.json", "metrics.jsonl", "summary.json", "evaluation.json", "code.txt", "code.diff",
                "command.txt")
RESULTS_ENV = "STEPJAX_RESULTS"
RUNS_DIR = "runs"
CODE_VERSION_ENV = "STEPJAX_CODE_VERSION"


def _git(directory, *args) -> str:
    """The output of ``git -C directory ARGS``; raises `OSError` or `CalledProcessError` outside a checkout."""
    return subprocess.run(["git", "-C", str(directory), *args], capture_output=True, text=True, check=True).stdout


def code_version(directory=Path(__file__).resolve().parents[1]) -> str:
    """The git commit of the code in `directory` (short hash, ``+dirty`` with uncommitted changes
    to tracked files); outside a git checkout (a copy of the tree, as a device machine gets)
    ``$STEPJAX_CODE_VERSION`` if set (the campaign runner sets the version staged with it), else
    ``unknown``."""
    try:
        commit = _git(directory, "rev-parse", "--short", "HEAD").strip()
        dirty = _git(directory, "status", "--porcelain", "--untracked-files=no").strip()
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get(CODE_VERSION_ENV) or "unknown"
    return commit + ("+dirty" if dirty else "")


CODE_PATHS = ("stepjax", "experiments", "benchmarks")  # the code a run executes, for `code_changes`


def code_changes(directory=Path(__file__).resolve().parents[1]) -> str:
    """The uncommitted changes to the code of the checkout in `directory` (``git diff HEAD`` of
    `CODE_PATHS`): what a ``+dirty`` version ran beyond its commit. Empty when there are none or
    outside a git checkout."""
    try:
        return _git(directory, "diff", "HEAD", "--", *CODE_PATHS)
    except (OSError, subprocess.CalledProcessError):
        return ""


# the checkout's version and uncommitted code changes when this module was loaded, recorded in a
# run's code.txt and code.diff: a long-lived process (the lottery) keeps running the code it
# imported, whatever the checkout says later
LOADED_CODE = code_version()
LOADED_CHANGES = code_changes()


def results_root() -> Path:
    """Where records go: ``$STEPJAX_RESULTS`` if set, else ``results`` in the working directory."""
    return Path(os.environ.get(RESULTS_ENV) or "results")


def record_path(workdir: str | Path, root: str | Path | None = None) -> Path:
    """The record directory of a run directory: ``runs/a/b`` -> ``<root>/a/b``, else ``<root>/<name>``.

    **Arguments:**

    - `workdir`: a run directory (relative or absolute).
    - `root`: the results tree (default `results_root`).

    **Returns:**

    The path of its record (not created).
    """
    root = Path(root) if root is not None else results_root()
    parts = Path(os.path.abspath(workdir)).parts
    if RUNS_DIR in parts:
        inside = parts[len(parts) - parts[::-1].index(RUNS_DIR):]
        if inside:
            return root.joinpath(*inside)
    return root / Path(os.path.abspath(workdir)).name


def finished_run(workdir: str | Path) -> Path | None:
    """Where the files of a finished run are: `workdir` when its summary says done, else its record
    (`record_path`) when that says done: a run finished in an earlier checkout, whose run directory
    is gone. Only a run directory under ``runs/`` has a record of its own (one outside is filed by
    its name alone). None while the run is not finished.

    **Arguments:**

    - `workdir`: a run directory (it need not exist).

    **Returns:**

    `workdir`, its record directory, or None.
    """
    inside_runs = RUNS_DIR in Path(os.path.abspath(workdir)).parts[:-1]
    for folder in (Path(workdir), record_path(workdir)) if inside_runs else (Path(workdir),):
        summary = folder / "summary.json"
        if summary.exists():
            return folder if json.loads(summary.read_text()).get("status") == "done" else None
    return None


def file_run(workdir: str | Path, dest: str | Path | None = None) -> Path:
    """Copy the record of a run directory (the `RECORD_FILES` it has) into the results tree.

    **Arguments:**

    - `workdir`: the run directory.
    - `dest`: the record directory (default `record_path`).

    **Returns:**

    The record directory. Files absent from `workdir` are left out; an older copy of them in the
    record is removed so that the record never mixes two states of a run.
    """
    workdir = Path(workdir)
    if not (workdir / "config.json").exists():
        raise FileNotFoundError(f"{workdir} has no config.json: not a run directory, nothing to file.")
    dest = Path(dest) if dest is not None else record_path(workdir)
    dest.mkdir(parents=True, exist_ok=True)
    for name in RECORD_FILES:
        source, target = workdir / name, dest / name
        if source.exists():
            shutil.copyfile(source, target)
        elif target.exists():
            target.unlink()
    return dest


def digest(data) -> str:
    """A short, stable digest of a figure's data (JSON with sorted keys): what the drift test compares
    instead of pixels."""
    text = json.dumps(data, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# one analysis's record (``results/analysis/<name>/``): the data of every figure, as gzip-compressed
# JSON, a quarter of the plain text's size (the working tree travels with every device call)
ANALYSIS_RECORD = "analysis.json.gz"


def analysis_record(source: str | Path) -> Path | None:
    """The analysis record file that `source` names (a directory holding `ANALYSIS_RECORD`, or the
    file itself), or None when there is none."""
    path = Path(source)
    path = path / ANALYSIS_RECORD if path.is_dir() else path
    return path if path.name == ANALYSIS_RECORD and path.is_file() else None


def write_analysis_record(directory: str | Path, report: dict) -> Path:
    """Write `report` (JSON-ready) as the analysis record of `directory` (made); returns its path.
    The bytes depend on the report alone (no time stamp in the gzip header)."""
    path = Path(directory) / ANALYSIS_RECORD
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(report, separators=(",", ":"))
    path.write_bytes(gzip.compress(text.encode(), compresslevel=9, mtime=0))
    return path


def read_analysis_record(source: str | Path) -> dict:
    """The report of the analysis record that `source` names (see `analysis_record`); a missing one
    raises `FileNotFoundError` naming it and how to make one."""
    path = analysis_record(source)
    if path is None:
        raise FileNotFoundError(f"{source}: no analysis record ({ANALYSIS_RECORD}); make one with "
                                "`make analyze WORKDIR=...` (python -m stepjax.analysis).")
    return json.loads(gzip.decompress(path.read_bytes()))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stepjax.records", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workdirs", nargs="+", help="run directories (each with config.json), or folders of them (hidden folders such as "
                        ".cut, runs set aside, are skipped)")
    parser.add_argument("--root", help=f"results tree (default ${RESULTS_ENV} or ./results)")
    args = parser.parse_args(argv)
    found = [p for w in map(Path, args.workdirs) for p in ([w] if (w / "config.json").exists() else sorted(
        c.parent for c in w.rglob("config.json") if not any(part.startswith(".") for part in c.relative_to(w).parts)))]
    if not found:
        print(f"stepjax.records: no run directory (with config.json) under {' '.join(args.workdirs)}.", file=sys.stderr)
        return 2
    for workdir in found:
        print(f"{workdir} -> {file_run(workdir, record_path(workdir, args.root))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
