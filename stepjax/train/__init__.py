"""Training: pure steps, the loop, checkpoints and metrics."""

from stepjax.train.checkpoint import Checkpointer, CheckpointError
from stepjax.train.loop import NonFiniteLossError, evaluate, load_run, restore_run, train
from stepjax.train.metrics import MetricWriter, Progress, format_summary, read_metrics
from stepjax.train.step import TrainState, init_state, make_eval_step, make_optimizer, make_train_step, train_step_fn

__all__ = [
    "CheckpointError",
    "Checkpointer",
    "MetricWriter",
    "NonFiniteLossError",
    "Progress",
    "TrainState",
    "evaluate",
    "format_summary",
    "init_state",
    "load_run",
    "make_eval_step",
    "make_optimizer",
    "make_train_step",
    "read_metrics",
    "restore_run",
    "train",
    "train_step_fn",
]
