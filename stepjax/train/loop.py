"""The training loop: data -> jitted step -> metrics, evaluation, checkpoints, resume."""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import math
import signal
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from stepjax import data, parallel
from stepjax.config import read_run_config, validate
from stepjax.errors import DIVERGED, StepjaxError, UserError
from stepjax.models import build_model
from stepjax.records import LOADED_CHANGES, LOADED_CODE
from stepjax.train import lock
from stepjax.train.checkpoint import Checkpointer, saved_steps
from stepjax.train.metrics import METRICS_FILE, MetricWriter, Progress, drop_records_after, format_summary
from stepjax.train.status import unresumable_leftovers
from stepjax.train.step import (
    TrainState,
    init_state,
    learning_rate_schedule,
    make_optimizer,
    run_programs,
)

log = logging.getLogger("stepjax")


class NonFiniteLossError(StepjaxError, RuntimeError):
    """Training produced a NaN or infinite loss."""

    exit_status = DIVERGED


def _check_workdir_config(workdir: Path, config) -> None:
    """Refuse to resume a workdir that holds a different model or dataset, naming what differs."""
    if not (workdir / "config.json").exists():
        return
    saved = json.loads(read_run_config(workdir).to_json())
    current = json.loads(config.to_json())
    for key in ("model", "data"):
        differences = _differences(saved.get(key) or {}, current.get(key) or {}, key)
        if differences:
            raise UserError(
                f"{workdir} holds a run with a different `{key}` config ({'; '.join(differences[:3])}); "
                "resuming it would mix two experiments. Rerun it as its command.txt says, use another "
                "workdir (WORKDIR=... / --workdir), or delete this one."
            )


def _differences(saved: dict, current: dict, prefix: str) -> list[str]:
    """``"<key>: <saved> in the run, <current> now"`` for each field that differs."""
    return [f"{prefix}.{k}: {saved.get(k)!r} in the run, {current.get(k)!r} now"
            for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]


class _StopSignals:
    """Turns SIGTERM and SIGINT (Ctrl-C) into a flag checked between steps, so that a checkpoint is
    saved before the run stops. A repeated signal is reported and ignored: it cannot cut the save
    short (SIGKILL still can; the rerun then resumes from the previous checkpoint)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.requested = False
        self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

    def _handle(self, signum, frame):
        name, again = signal.Signals(signum).name, self.requested
        self.requested = True  # first: a second signal may interrupt the logging below
        if again:
            log.warning("%s received again: still saving the checkpoint, please wait.", name)
        else:
            log.warning("%s received: saving a checkpoint and stopping (rerun the same command to resume).", name)

    def restore(self):
        for s, handler in self._previous.items():
            signal.signal(s, handler)


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
        raise UserError(f"{workdir}/checkpoints holds no checkpoint: train the run first (or finish it by "
                        "rerunning its command.txt).")
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


def train(config: ml_collections.ConfigDict, workdir: str | Path, *, command: str | None = None,
          discard_record: bool = False) -> dict:
    """Train (or resume) the run of `config` in `workdir`.

    The workdir is locked for the run (`stepjax.train.lock`). Everything that can refuse the run is
    checked before anything is written: the config, both data splits, the checkpoints and the
    record. SIGTERM and SIGINT save a checkpoint and end the run early (a repeated signal does not
    interrupt the save).

    **Arguments:**

    - `config`: an experiment config (see ``experiments/``).
    - `workdir`: where checkpoints, ``metrics.jsonl``, TensorBoard events, ``config.json``,
      ``code.txt`` and ``summary.json`` go. Re-running with the same workdir resumes from the latest
      checkpoint; the records of the steps after it are dropped from ``metrics.jsonl``.
    - `command`: the command line that started the run, written to ``command.txt``.
    - `discard_record`: start from step 0 over a record (``metrics.jsonl``) that has no finished
      checkpoint, dropping it; without it such a workdir is refused.

    **Returns:**

    The run summary (also written to ``summary.json``), with ``status`` ``"done"`` or
    ``"preempted"``.

    **Raises:**

    `UserError` (nothing written; e.g. `WorkdirLocked`, `CheckpointError`), `CheckpointSaveError`,
    `NonFiniteLossError`.
    """
    workdir = Path(workdir)
    with lock.hold_workdir(workdir):
        mesh = parallel.data_mesh(config.mesh.num_devices)
        validate(config, mesh.size)
        _check_workdir_config(workdir, config)
        _check_resumable(workdir, discard_record)
        loader = data.TrainLoader(
            config.data, seed=config.seed, global_batch=config.train.global_batch,
            process_index=jax.process_index(), process_count=jax.process_count(),
        )
        data.open_source(config.data, "test")  # a broken test file is refused now, not at the first evaluation
        checkpointer = Checkpointer(
            workdir / "checkpoints", max_to_keep=config.train.keep_checkpoints,
            save_interval_steps=config.train.checkpoint_every_steps,
        )
        try:
            return _train(config, workdir, mesh, loader, checkpointer, command)
        finally:
            checkpointer.close()


def _check_resumable(workdir: Path, discard_record: bool) -> None:
    """Refuse to start from step 0 over a record whose checkpoint never finished; name the leftovers
    of a save cut short."""
    finished, unfinished = saved_steps(workdir / "checkpoints")
    if finished:
        if unfinished:
            log.warning("Dropping %s: a checkpoint save cut short (the process was killed while saving); "
                        "resuming from the newest finished checkpoint.", ", ".join(p.name for p in unfinished))
        return
    found = unresumable_leftovers(workdir)
    if not found:
        return
    if discard_record:
        log.warning("Starting afresh over %s in %s (--discard-record).", " and ".join(found), workdir)
        return
    raise UserError(
        f"{workdir} holds {' and '.join(found)} but no finished checkpoint: training would restart from "
        "step 0 over that record. Rerun with --discard-record to start afresh (the record is dropped), "
        "or move the workdir aside to keep it."
    )


def _train(config, workdir: Path, mesh, loader, checkpointer, command) -> dict:
    primary = jax.process_index() == 0
    steps_per_epoch = loader.steps_per_epoch
    total_steps = config.train.total_steps or config.train.epochs * steps_per_epoch
    model = build_model(config)
    programs = run_programs(config, nnx.graphdef(model), steps_per_epoch, total_steps, mesh)
    graphdef, state = init_state(model, programs.tx)
    state = jax.device_put(state, parallel.replicated(mesh))
    record = {"best_accuracy": None, "best_epoch": None, "last_accuracy": None, "last_epoch": None,
              "wall_time_s": 0.0, "eval_time_s": 0.0, "trained_images": 0}
    restored = checkpointer.restore_latest(_abstract(state._asdict(), mesh))
    if restored is not None:
        _, saved, extra = restored
        state = TrainState(**saved)
        loader.set_state(extra["data"])
        record.update(extra["record"])
    if primary:  # the run is accepted: record it
        _record_start(workdir, config, command, int(state.step))
    log.info("%s: %d devices, %d processes, %d steps per epoch, %d steps%s.", config.experiment, mesh.size,
             jax.process_count(), steps_per_epoch, total_steps,
             f"; resumed from step {int(state.step)} in {workdir}" if restored is not None else "")
    if mesh.devices.flat[0].platform == "cpu":
        log.info("host memory: %s.", parallel.host_pages())

    run = _Run(
        config, mesh, loader, checkpointer, record, steps_per_epoch, total_steps,
        train_step=programs.train_step,
        eval_step=programs.eval_step,
        writer=MetricWriter(workdir, enabled=primary),
        progress=Progress(total_steps, int(state.step), enabled=primary and config.train.progress),
        stop=_StopSignals(),
    )
    try:
        status, step = _run(run, state)
    finally:
        run.progress.close()
        run.writer.close()
        run.stop.restore()
    return _finish(workdir, record, status, step, primary)


def _record_start(workdir: Path, config, command: str | None, step: int) -> None:
    """Write the run's config, command and code version (with a dirty checkout, also its uncommitted
    code changes, in ``code.diff``), and drop the records of the steps after `step` (trained again
    now) from its metrics."""
    (workdir / "config.json").write_text(config.to_json(indent=2))
    if command is not None:
        (workdir / "command.txt").write_text(command + "\n")
    started = f"{datetime.datetime.now().astimezone().isoformat(timespec='seconds')} {LOADED_CODE}"
    with open(workdir / "code.txt", "a") as f:  # one line per start: a resumed run may span code versions
        f.write(started + "\n")
    if LOADED_CHANGES:  # a +dirty start: what it ran beyond its commit
        with open(workdir / "code.diff", "a") as f:
            f.write(f"# start {started}\n{LOADED_CHANGES}")
    dropped = drop_records_after(workdir / METRICS_FILE, step)
    if dropped:
        log.info("Dropped %d records after step %d from %s: those steps are trained again.", dropped, step,
                 METRICS_FILE)


@dataclasses.dataclass
class _Run:
    """One start of a run: what it trains with, where its outputs go, and its running record (images,
    wall time and accuracies, saved in every checkpoint)."""

    config: ml_collections.ConfigDict
    mesh: jax.sharding.Mesh
    loader: data.TrainLoader
    checkpointer: Checkpointer
    record: dict
    steps_per_epoch: int
    total_steps: int
    train_step: Callable
    eval_step: Callable
    writer: MetricWriter
    progress: Progress
    stop: _StopSignals


def _save(run: _Run, state, force=False):
    """Save and wait until it is on disk, so that a failed write stops the run at once."""
    extra = {"data": run.loader.get_state(), "record": run.record}
    run.checkpointer.save(int(state.step), state._asdict(), extra, force=force)
    run.checkpointer.wait()


def _run(run: _Run, state):
    """Train from `state` to the last step, or until a stop signal or `train.halt_after_steps`.

    **Returns:** ``(status, step)``: ``"done"`` or ``"preempted"``, and the step reached.
    """
    step = int(state.step)
    halt = run.config.train.halt_after_steps
    window_start, window_images, metrics = time.time(), 0, None
    while step < run.total_steps:
        if run.stop.requested or (halt is not None and step >= halt):
            if metrics is not None:
                _check_finite(_host(metrics), step)
            _close_window(run.record, window_start, window_images)
            _save(run, state, force=True)
            return "preempted", step
        state, metrics = run.train_step(state, parallel.global_batch(next(run.loader), run.mesh))
        step += 1
        window_images += run.config.train.global_batch
        end_of_epoch = step % run.steps_per_epoch == 0 or step == run.total_steps
        if step % run.config.train.log_every_steps == 0 or end_of_epoch or run.checkpointer.should_save(step):
            _log_train(run, metrics, step, window_start, window_images)
            window_start, window_images = time.time(), 0
        epoch = math.ceil(step / run.steps_per_epoch)
        if end_of_epoch and (epoch % run.config.train.eval_every_epochs == 0 or step == run.total_steps):
            _evaluate_epoch(run, state, step, epoch)
            window_start = time.time()
        if run.checkpointer.should_save(step) or (end_of_epoch and step == run.total_steps):
            _save(run, state, force=step == run.total_steps)
    return "done", step


def _log_train(run: _Run, metrics, step, window_start, window_images):
    values = _check_finite(_host(metrics), step)
    values["images_per_sec"] = _close_window(run.record, window_start, window_images)
    run.writer.write(step, values, split="train")
    run.progress.update(step, loss=values["loss"], accuracy=values["accuracy"],
                        images_per_sec=values["images_per_sec"])


def _evaluate_epoch(run: _Run, state, step, epoch):
    eval_start = time.time()
    result = evaluate(run.eval_step, state, run.config, run.mesh)
    run.writer.write(step, {**result, "epoch": epoch}, split="test")
    _update_record(run.record, result["accuracy"], epoch)
    run.record["eval_time_s"] = run.record.get("eval_time_s", 0.0) + time.time() - eval_start


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
