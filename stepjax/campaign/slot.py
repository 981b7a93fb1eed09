"""One GPU slot, prepared on the CPU side: what the next item needs on the device (CIFAR-10, the
wheels the device image lacks, the run directories it resumes or analyses), cut into calls that
fit beside this checkout's working tree, and the exact device calls that send them and run it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from stepjax.campaign import plan as planning
from stepjax.campaign import staging
from stepjax.records import RUNS_DIR

# the packages the device image lacks (KINDS.md lists what it has), pinned as in requirements.txt
WHEELS = ("grain==0.2.18", "array_record==0.8.6", "portpicker==1.6.0", "ml_collections==1.1.0")
SITE = "/tmp/stepjax/site"
RUN_BUDGET_S = planning.BUDGET_S  # the runner's budget: with the last part's arrival, within 9 minutes
# the largest working tree beside which the coded CIFAR-10 (84.5 MiB) and the wheels still go in
# three calls; every call sends the tree again, so the figures and records in git count here
TREE_BUDGET = 32 * staging.MIB


def tree_bytes(repo: str | Path) -> int:
    """Bytes of what a device call sends of the checkout `repo`: its tracked files and the untracked
    files git does not ignore (a ``shared/`` folder in the checkout included, if git ignores it)."""
    listed = subprocess.run(["git", "-C", str(repo), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            capture_output=True, text=True, check=True).stdout.split("\0")
    paths = {Path(repo) / name for name in listed if name}
    shared = Path(repo) / "shared"
    if shared.is_dir():
        paths |= {p for p in shared.rglob("*")}
    return sum(p.stat().st_size for p in paths if p.is_file() and not p.is_symlink())


def needed_runs(item: planning.Item, results: str | Path, base: str | Path) -> list[Path]:
    """The local run directories (``<base>/runs/<record>``, with a checkpoint) that the device
    needs for `item`: its unfinished trainings (to resume) and the inputs of its unfinished analyses."""
    todo = planning.pending(item, results)
    records = [t.record for t in todo["trainings"]]
    records += [r for a in todo["analyses"] for r in (a.model, a.compare) if r and r not in records]
    workdirs = [Path(base) / RUNS_DIR / r for r in records]
    return [w for w in workdirs if staging.latest_checkpoint(w) is not None]


def wheels(folder: str | Path) -> list[Path]:
    """The wheels in `folder`, one per `WHEELS` package; refuses a missing one with one line."""
    found = sorted(Path(folder).glob("*.whl"))
    missing = [w.split("==")[0] for w in WHEELS if not any(_wheel_name(w) in p.name.lower() for p in found)]
    if missing:
        raise FileNotFoundError(f"no wheel of {', '.join(missing)} in {folder}/: run `make campaign-wheels` "
                                "(downloads them for the device's Python 3.12).")
    return found


PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64")


def download_wheels(folder: str | Path) -> int:
    """``pip download`` the `WHEELS` for the device (CPython 3.12, x86-64 Linux) into `folder`;
    returns pip's exit status."""
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
               "--python-version", "3.12", "--implementation", "cp", *platforms, "-d", str(folder), *WHEELS]
    return subprocess.run(command).returncode


def _wheel_name(requirement: str) -> str:
    return requirement.split("==")[0].lower().replace("-", "_") + "-"


def device_command(call: int, calls: int, item_key: str | None) -> str:
    """The shell command of staging call `call` of `calls` (the last one also runs the item)."""
    receive = f"export PYTHONUNBUFFERED=1; python3 stepjax/campaign/staging.py receive stage/call{call}"
    if call < calls:
        return receive
    item = f" --item {item_key}" if item_key else ""
    return (f"{receive} && PYTHONPATH=$PWD:{SITE} python3 -m stepjax.campaign run --out $OUT"
            f"{item} --budget-s {RUN_BUDGET_S}")


def call_sequence(manifest: dict, item_key: str | None) -> list[dict]:
    """The device calls of a slot: ``{"command", "carry", "timeout_s"}`` each, in order."""
    n = manifest["calls"]
    return [{"command": device_command(k, n, item_key), "carry": [f"stage/call{k}"], "timeout_s": 600 if k == n else 120}
            for k in range(1, n + 1)]


def render_calls(calls: list[dict], manifest: dict, item: planning.Item, capacity: int) -> str:
    """The calls as the markdown that `make campaign-stage` prints and writes to stage/CALLS.md."""
    sizes = {k: sum(f["size"] for f in manifest["files"] if f["call"] == k) for k in range(1, len(calls) + 1)}
    lines = [f"# Device calls for item `{item.key}` ({item.title})", "",
             f"Each call carries at most {capacity / staging.MIB:.1f} MiB beside the working tree. Send them one "
             "after the other, each as soon as the last returns (the machine stays warm 30 s):", ""]
    for k, call in enumerate(calls, 1):
        lines += [f"{k}. `run` command=`{call['command']}` carry=`{json.dumps(call['carry'])}` timeout_s={call['timeout_s']} "
                  f"({sizes[k] / staging.MIB:.1f} MiB)"]
    lines += ["", "Then, here: `make campaign-file DIR=<files_at of the last call>` and `make results`.", ""]
    return "\n".join(lines)
