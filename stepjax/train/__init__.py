"""Training: pure steps, the loop, checkpoints, metrics and the workdir lock."""

from stepjax.train.after_run import StopAfterRun
from stepjax.train.checkpoint import Checkpointer, CheckpointError, CheckpointSaveError
from stepjax.train.lock import WorkdirLock, WorkdirLocked, claim_dir, claimed, hold_workdir, lock_holder
from stepjax.train.loop import NonFiniteLossError, evaluate, load_run, restore_run, train
from stepjax.train.metrics import MetricWriter, Progress, drop_records_after, format_summary, read_metrics
from stepjax.train.status import RunStatus, describe_status, run_status, set_aside_cut_run
from stepjax.train.step import (
    Programs,
    TrainState,
    init_state,
    make_eval_step,
    make_optimizer,
    make_train_step,
    run_programs,
    train_step_fn,
)

__all__ = [
    "CheckpointError",
    "CheckpointSaveError",
    "Checkpointer",
    "MetricWriter",
    "NonFiniteLossError",
    "Programs",
    "Progress",
    "RunStatus",
    "StopAfterRun",
    "TrainState",
    "WorkdirLock",
    "WorkdirLocked",
    "claim_dir",
    "claimed",
    "describe_status",
    "drop_records_after",
    "evaluate",
    "format_summary",
    "hold_workdir",
    "init_state",
    "load_run",
    "lock_holder",
    "make_eval_step",
    "make_optimizer",
    "make_train_step",
    "read_metrics",
    "restore_run",
    "run_programs",
    "run_status",
    "set_aside_cut_run",
    "train",
    "train_step_fn",
]
