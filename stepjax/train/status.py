"""Where a run directory stands, read without taking its lock: for the status of long plans of runs
(``python -m stepjax.study --status``) that span several sessions and processes."""

from __future__ import annotations

import dataclasses
import json
import logging
import statistics
import time
from pathlib import Path

from stepjax.records import finished_run
from stepjax.train.checkpoint import saved_steps
from stepjax.train.lock import lock_holder
from stepjax.train.metrics import METRICS_FILE, read_metrics

RATE_WINDOW = 10  # training records (of `log_every_steps` steps each) behind the rate of a running run
log = logging.getLogger("stepjax")
CUT_DIR = ".cut"  # <root>/.cut/<run>.<time>: runs cut before their first checkpoint, set aside by `set_aside_cut_run`


@dataclasses.dataclass(frozen=True)
class RunStatus:
    """One run directory's state.

    - `state`: ``"done"`` (its summary, or its record once the directory is gone, says so),
      ``"training"`` (a live process holds its writer's lock), ``"stopped"`` (trained part of the
      way, nobody trains it now: rerunning resumes from `checkpoint`) or ``"pending"`` (nothing
      trained).
    - `step`: the last logged training step; `checkpoint`: the newest finished checkpoint's.
    - `total_steps`: the run's length, once known: its `train.total_steps`, or `train.epochs` times
      the steps of an epoch, read off its first evaluation (None before that).
    - `images_per_sec`: the median rate of its last `RATE_WINDOW` training records.
    - `logged_at`: the Unix time of its last record; `holder`: the lock's holder while training.
    - `best_accuracy`: of a finished run; `batch`: its global batch.
    """

    state: str
    step: int | None = None
    checkpoint: int | None = None
    total_steps: int | None = None
    images_per_sec: float | None = None
    logged_at: float | None = None
    holder: dict | None = None
    best_accuracy: float | None = None
    batch: int | None = None

    def remaining_s(self) -> float | None:
        """Seconds of training left at the recent rate, where the length and the rate are known."""
        if None in (self.total_steps, self.step, self.batch) or not self.images_per_sec:
            return None
        return (self.total_steps - self.step) * self.batch / self.images_per_sec


def run_status(workdir: str | Path) -> RunStatus:
    """The `RunStatus` of one run directory (it need not exist)."""
    workdir = Path(workdir)
    folder = finished_run(workdir)
    if folder is not None:
        summary = json.loads((folder / "summary.json").read_text())
        return RunStatus("done", step=summary.get("steps"), total_steps=summary.get("steps"),
                         best_accuracy=summary.get("best_accuracy"))
    path = workdir / METRICS_FILE
    records = read_metrics(path) if path.exists() else []
    train = [r for r in records if r.get("split") == "train"]
    finished, unfinished = saved_steps(workdir / "checkpoints")
    holder = lock_holder(workdir)
    if not (records or finished or unfinished or holder):
        return RunStatus("pending")
    config = json.loads((workdir / "config.json").read_text()) if (workdir / "config.json").exists() else {}
    rates = [r["images_per_sec"] for r in train[-RATE_WINDOW:] if "images_per_sec" in r]
    return RunStatus(
        "training" if holder else "stopped",
        step=train[-1]["step"] if train else None,
        checkpoint=finished[-1] if finished else None,
        total_steps=_total_steps(config.get("train", {}), records),
        images_per_sec=statistics.median(rates) if rates else None,
        logged_at=records[-1].get("time") if records else None,
        holder=holder,
        batch=config.get("train", {}).get("global_batch"),
    )


def _total_steps(train: dict, records: list[dict]) -> int | None:
    if train.get("total_steps"):
        return train["total_steps"]
    evals = [r["step"] for r in records if r.get("split") != "train"]
    if not evals or not train.get("epochs"):
        return None
    return train["epochs"] * evals[0] // train.get("eval_every_epochs", 1)


def describe_status(status: RunStatus, now: float | None = None) -> str:
    """One line of a status report: the state and what is known of its progress."""
    now = time.time() if now is None else now
    if status.state in ("done", "pending"):
        return status.state if status.best_accuracy is None else f"done, best {100 * status.best_accuracy:.2f} %"
    parts = [f"{status.state} at step {status.step or 0}" + (f" of {status.total_steps}" if status.total_steps else "")]
    if status.logged_at is not None:
        parts.append(f"last logged {(now - status.logged_at) / 60:.0f} min ago")
    if status.state == "training":
        parts.append(f"by pid {status.holder['pid']} on {status.holder['host']}")
        remaining = status.remaining_s()
        if remaining is not None:
            parts.append(f"about {remaining / 60:.0f} min left at {status.images_per_sec:.0f} images/s")
    else:
        parts.append(f"resumes from step {status.checkpoint}" if status.checkpoint is not None
                     else "no checkpoint: the study and the lottery set it aside and train it afresh; "
                          "a single training needs --discard-record")
    return ", ".join(parts)


def unresumable_leftovers(workdir: str | Path) -> list[str]:
    """What a run directory without a finished checkpoint holds, which training would restart from
    step 0 over (its metrics records, a save cut short), described; empty when it holds a finished
    checkpoint or nothing. Training refuses such a directory (`stepjax.train.train`'s
    `discard_record`); the plans set it aside (`set_aside_cut_run`)."""
    workdir = Path(workdir)
    finished, unfinished = saved_steps(workdir / "checkpoints")
    if finished:
        return []
    path = workdir / METRICS_FILE
    records = read_metrics(path) if path.exists() else []
    found = [f"{len(records)} records up to step {records[-1]['step']} in {METRICS_FILE}"] if records else []
    names = ", ".join(p.name for p in unfinished)
    return found + ([f"an unfinished checkpoint ({names}, a save cut short)"] if unfinished else [])


def set_aside_cut_run(workdir: str | Path) -> Path | None:
    """Move a run that was cut before its first checkpoint (killed, not stopped: nothing to resume
    from) to ``<root>/.cut/<run>.<time>``, so that a plan's next start trains it afresh instead of
    being refused over its record; nothing is deleted. Returns where it went, or None when the run
    is not in that state (pending, resumable, training or done).

    For commands that work through a plan unattended (the study, the lottery); a single training
    refuses instead and names the choice (`stepjax.train.train`'s `discard_record`).
    """
    workdir = Path(workdir)
    if lock_holder(workdir) is not None or not unresumable_leftovers(workdir):
        return None
    step = run_status(workdir).step
    target = workdir.parent / CUT_DIR / f"{workdir.name}.{time.strftime('%Y%m%dT%H%M%S')}"
    target.parent.mkdir(parents=True, exist_ok=True)
    workdir.rename(target)
    log.warning("%s was cut at step %s, before its first checkpoint, so it cannot resume: moved aside to %s; "
                "training it afresh.", workdir, step, target)
    return target
