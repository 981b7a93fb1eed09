"""The training loop: data -> jitted step -> metrics, evaluation, checkpoints, resume."""

from __future__ import annotations

import json
import logging
import math
import signal
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from stepjax import data, parallel
from stepjax.config import read_run_config, validate
from stepjax.models import build_model
from stepjax.train.checkpoint import Checkpointer
from stepjax.train.metrics import MetricWriter, Progress, format_summary
from stepjax.train.step import (
    TrainState,
    init_state,
    learning_rate_schedule,
    make_eval_step,
    make_optimizer,
    make_train_step,
)

log = logging.getLogger("stepjax")


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss."""


def _check_workdir_config(workdir: Path, config) -> None:
    """Refuse to resume a workdir that holds a different model or dataset."""
    if not (workdir / "config.json").exists():
        return
    saved = json.loads(read_run_config(workdir).to_json())
    current = json.loads(config.to_json())
    for key in ("model", "data"):
        if saved.get(key) != current.get(key):
            raise ValueError(
                f"{workdir} holds a run with a different `{key}` config; resuming it would mix two "
                "experiments. Use another workdir (WORKDIR=... / --workdir), or delete this one."
            )


class _Preemption:
    """Turns SIGTERM into a flag checked between steps, so a checkpoint is written first."""

    def __init__(self):
        self.requested = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        log.warning("SIGTERM received: saving a checkpoint and stopping.")
        self.requested = True

    def restore(self):
        signal.signal(signal.SIGTERM, self._previous)


def _host(tree):
    return jax.tree.map(lambda a: np.asarray(jax.device_get(a)), tree)


def evaluate(eval_step, state, config, mesh) -> dict:
    """Test loss, accuracy and per-block mean step size over the whole test split (and
    ``flip_accuracy``, ``flip_loss`` when `eval_step` was made with ``flip=True``)."""
    totals = None
    for batch in data.eval_batches(
        config.data, global_batch=config.train.eval_batch,
        process_index=jax.process_index(), process_count=jax.process_count(),
    ):
        sums = eval_step(state, parallel.global_batch(batch, mesh))
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    totals = _host(totals)
    count = float(totals["count"])
    result = {
        "accuracy": float(totals["correct"]) / count,
        "loss": float(totals["loss"]) / count,
        "step_size": (totals["step_size"] / count).round(5).tolist(),
    }
    if "flip_correct" in totals:
        result["flip_accuracy"] = float(totals["flip_correct"]) / count
        result["flip_loss"] = float(totals["flip_loss"]) / count
    return result


def restore_run(workdir: str | Path, dtype: str | None = None):
    """The config and latest readable `TrainState` of a run directory.

    **Arguments:**

    - `workdir`: a directory written by `train`.
    - `dtype`: rebuild the model in this compute dtype instead of the run's (``'float32'`` to
      analyse a run trained in bfloat16; the parameters are float32 either way). The returned
      config says so.

    **Returns:**

    `(config, graphdef, step, state, extra)`: `extra` holds the data-iterator state and the
    accuracy record.
    """
    workdir = Path(workdir)
    config = read_run_config(workdir)
    if dtype is not None:
        config.model.dtype = dtype
    tx = make_optimizer(config.optim, learning_rate_schedule(config.optim, 1, 1))
    graphdef, state = init_state(build_model(config), tx)
    checkpointer = Checkpointer(workdir / "checkpoints")
    try:
        restored = checkpointer.restore_latest(_abstract(state._asdict(), parallel.data_mesh()))
    finally:
        checkpointer.close()
    if restored is None:
        raise FileNotFoundError(f"{workdir}/checkpoints holds no checkpoint.")
    step, saved, extra = restored
    return config, graphdef, step, TrainState(**saved), extra


def load_run(workdir: str | Path, dtype: str | None = None):
    """The config, trained model (in evaluation mode) and step of a run directory (`dtype`: see
    `restore_run`)."""
    config, graphdef, step, state, _ = restore_run(workdir, dtype)
    model = nnx.merge(graphdef, state.params, state.rest)
    model.eval()
    return config, model, step


def _abstract(state, mesh):
    sharding = parallel.replicated(mesh)
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), state)


def train(config: ml_collections.ConfigDict, workdir: str | Path) -> dict:
    """Train (or resume) the run of `config` in `workdir`.

    **Arguments:**

    - `config`: an experiment config (see ``experiments/``).
    - `workdir`: where checkpoints, ``metrics.jsonl``, TensorBoard events, ``config.json`` and
      ``summary.json`` go. Re-running with the same workdir resumes from the latest checkpoint.

    **Returns:**

    The run summary (also written to ``summary.json``), with ``status`` ``"done"`` or
    ``"preempted"``.
    """
    workdir = Path(workdir)
    primary = jax.process_index() == 0
    mesh = parallel.data_mesh(config.mesh.num_devices)
    validate(config, mesh.size)
    _check_workdir_config(workdir, config)
    info = data.dataset_info(config.data)

    loader = data.TrainLoader(
        config.data, seed=config.seed, global_batch=config.train.global_batch,
        process_index=jax.process_index(), process_count=jax.process_count(),
    )
    steps_per_epoch = loader.steps_per_epoch
    total_steps = config.train.total_steps or config.train.epochs * steps_per_epoch
    schedule = learning_rate_schedule(config.optim, steps_per_epoch, total_steps)
    tx = make_optimizer(config.optim, schedule)
    graphdef, state = init_state(build_model(config), tx)
    state = jax.device_put(state, parallel.replicated(mesh))
    log.info("%s: %d devices, %d processes, %d steps per epoch, %d steps.", config.experiment,
             mesh.size, jax.process_count(), steps_per_epoch, total_steps)

    if primary:
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "config.json").write_text(config.to_json(indent=2))
    checkpointer = Checkpointer(
        workdir / "checkpoints", max_to_keep=config.train.keep_checkpoints,
        save_interval_steps=config.train.checkpoint_every_steps,
    )
    record = {"best_accuracy": None, "best_epoch": None, "last_accuracy": None, "last_epoch": None,
              "wall_time_s": 0.0, "eval_time_s": 0.0, "trained_images": 0}
    restored = checkpointer.restore_latest(_abstract(state._asdict(), mesh))
    if restored is not None:
        step, saved, extra = restored
        state = TrainState(**saved)
        loader.set_state(extra["data"])
        record.update(extra["record"])
        log.info("Resumed from step %d in %s.", step, workdir)

    train_step = make_train_step(graphdef, tx, schedule, config, info, mesh)
    eval_step = make_eval_step(graphdef, config, info, mesh, flip=config.train.eval_flip)
    writer = MetricWriter(workdir, enabled=primary)
    progress = Progress(total_steps, int(state.step), enabled=primary and config.train.progress)
    preemption = _Preemption()
    try:
        status, step = _run(config, state, loader, train_step, eval_step, checkpointer, writer, progress,
                      preemption, record, steps_per_epoch, total_steps, mesh)
    finally:
        preemption.restore()
        progress.close()
        checkpointer.wait()
        checkpointer.close()
        writer.close()
    return _finish(workdir, record, status, step, primary)


def _save(checkpointer, state, loader, record, force=False):
    extra = {"data": loader.get_state(), "record": record}
    checkpointer.save(int(state.step), state._asdict(), extra, force=force)


def _run(config, state, loader, train_step, eval_step, checkpointer, writer, progress, preemption,
         record, steps_per_epoch, total_steps, mesh):
    step = int(state.step)
    halt = config.train.halt_after_steps
    window_start, window_images, metrics = time.time(), 0, None
    while step < total_steps:
        if preemption.requested or (halt is not None and step >= halt):
            if metrics is not None:
                _check_finite(_host(metrics), step)
            _close_window(record, window_start, window_images)
            _save(checkpointer, state, loader, record, force=True)
            return "preempted", step
        state, metrics = train_step(state, parallel.global_batch(next(loader), mesh))
        step += 1
        window_images += config.train.global_batch
        end_of_epoch = step % steps_per_epoch == 0 or step == total_steps
        if step % config.train.log_every_steps == 0 or end_of_epoch or checkpointer.should_save(step):
            values = _check_finite(_host(metrics), step)
            values["images_per_sec"] = _close_window(record, window_start, window_images)
            writer.write(step, values, split="train")
            progress.update(step, loss=values["loss"], accuracy=values["accuracy"],
                            images_per_sec=values["images_per_sec"])
            window_start, window_images = time.time(), 0
        epoch = math.ceil(step / steps_per_epoch)
        if end_of_epoch and (epoch % config.train.eval_every_epochs == 0 or step == total_steps):
            eval_start = time.time()
            result = evaluate(eval_step, state, config, mesh)
            writer.write(step, {**result, "epoch": epoch}, split="test")
            _update_record(record, result["accuracy"], epoch)
            window_start = time.time()
            record["eval_time_s"] = record.get("eval_time_s", 0.0) + window_start - eval_start
        if checkpointer.should_save(step) or (end_of_epoch and step == total_steps):
            _save(checkpointer, state, loader, record, force=step == total_steps)
    return "done", step


def _close_window(record, window_start, window_images):
    """Adds the images and time since `window_start` to the run's record; returns their rate."""
    elapsed = time.time() - window_start
    record["wall_time_s"] += elapsed
    record["trained_images"] += window_images
    return window_images / max(elapsed, 1e-9)


def _check_finite(values, step):
    values = {k: float(v) for k, v in values.items()}
    if not math.isfinite(values["loss"]):
        raise NonFiniteLossError(
            f"Loss became {values['loss']} by step {step}. Stopped without saving; the last good "
            "checkpoint is kept. Try a lower optim.lr, optim.warmup_epochs=1, or model.dtype=float32."
        )
    return values


def _update_record(record, accuracy, epoch):
    record["last_accuracy"], record["last_epoch"] = accuracy, epoch
    if record["best_accuracy"] is None or accuracy > record["best_accuracy"]:
        record["best_accuracy"], record["best_epoch"] = accuracy, epoch


def _finish(workdir, record, status, step, primary):
    summary = {
        **record, "status": status, "steps": step,
        "images_per_sec": record["trained_images"] / max(record["wall_time_s"], 1e-9),
        "device": jax.devices()[0].device_kind,  # the kind of the last start's devices
    }
    if primary:
        (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
        if status == "done":
            print(format_summary(summary), flush=True)
    return summary
