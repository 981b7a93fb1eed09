"""Checkpointing of training state with orbax.

One checkpoint is a step directory holding two items:

- `state`: a pytree of `jax.Array`s (an `nnx.State` of model and optimizer, or its pure-dict
  form), written with `StandardSave`, possibly sharded and from several processes;
- `extra`: JSON metadata (data-iterator state, config, best accuracy, epoch, ...).

Saves are asynchronous: `save` returns once the arrays are copied off the device (so the
caller may donate them to the next step) and the files are written in the background;
`wait`/`close` block until they are on disk, and raise `CheckpointSaveError` (after removing
the partial checkpoint) when the write failed, e.g. on a full disk. A checkpoint that cannot
be read is never silently replaced by a fresh start: `restore_latest` falls back to the newest
readable one with a warning, and raises if none is readable. A save cut short by a killed
process leaves ``<step>.orbax-checkpoint-tmp...`` (`saved_steps` lists both kinds); orbax
deletes such leftovers when a `Checkpointer` is created.
"""

import errno
import itertools
import json
import logging
import os
import pathlib
import re
import shutil
import threading
from typing import Any

import jax
import orbax.checkpoint as ocp

from stepjax.errors import SAVE_FAILED, StepjaxError, UserError

logger = logging.getLogger(__name__)
# orbax counts the time `wait` spends on a save as time lost waiting for the previous one and warns
# at the next save; waiting for each save is stepjax's choice (a failed write must stop the run at once)
logging.getLogger("absl").addFilter(lambda record: not record.getMessage().startswith("Waiting for previous save"))

_STATE = "state"
_EXTRA = "extra"
_CORRUPT_SUFFIX = ".corrupt"
_UNFINISHED = ".orbax-checkpoint-tmp"
_WRITE_TIMEOUT_S = 120  # how long a failed save's other writes may take to end before it is removed
_barrier_ids = itertools.count()


def _describe(error: BaseException, limit: int = 160) -> str:
    """`Type: message` in one short line: the first line of the message, without the tensorstore
    spec that orbax appends to read errors."""
    message = re.sub(r"\s*\[?\s*tensorstore_spec\b.*", "", str(error), flags=re.DOTALL).strip()
    message = message.splitlines()[0] if message else ""
    if len(message) > limit:
        message = message[: limit - 3] + "..."
    return f"{type(error).__name__}: {message}"


def _disk_full(error: BaseException) -> bool:
    """Whether `error`, or an error it was raised from, says the disk is full."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if getattr(error, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def saved_steps(directory: str | os.PathLike) -> tuple[list[int], list[pathlib.Path]]:
    """What a checkpoint directory holds, without opening it (so without orbax's clean-up).

    **Arguments:**

    - `directory`: a `Checkpointer`'s directory (it need not exist).

    **Returns:**

    `(finished, unfinished)`: the steps of the finished checkpoints, ascending, and the paths of
    saves that never finished (left by a process killed while saving).
    """
    directory = pathlib.Path(directory)
    if not directory.is_dir():
        return [], []
    finished = sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit() and p.is_dir())
    return finished, sorted(directory.glob(f"*{_UNFINISHED}*"))


def _abstract(leaf: Any) -> Any:
    """Describes an array by shape, dtype and sharding.

    (`ocp.utils.to_shape_dtype_struct` would drop the sharding of typed PRNG keys.)
    """
    if isinstance(leaf, jax.Array):
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding)
    return leaf


class CheckpointError(UserError):
    """Raised when checkpoints exist but none of them can be restored."""


class CheckpointSaveError(StepjaxError):
    """A checkpoint could not be written (e.g. the disk is full); the earlier ones are intact."""

    exit_status = SAVE_FAILED


class Checkpointer:
    """Saves and restores `(step, state, extra)` under one directory.

    **Arguments:**

    - `directory`: where step directories (`<directory>/<step>`) are written.
    - `max_to_keep`: how many of the most recent checkpoints to keep.
    - `save_interval_steps`: `should_save(step)` is true when `step` is a multiple of it
      (or a preemption was signalled through JAX's preemption sync manager).
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        max_to_keep: int = 3,
        save_interval_steps: int = 1000,
    ):
        if max_to_keep < 1:
            raise ValueError(f"max_to_keep must be >= 1, got {max_to_keep}.")
        if save_interval_steps < 1:
            raise ValueError(f"save_interval_steps must be >= 1, got {save_interval_steps}.")
        self.directory = pathlib.Path(directory).absolute()
        self._max_to_keep = max_to_keep
        self._failed = False
        self._pending = None
        policies = ocp.checkpoint_managers
        options = ocp.CheckpointManagerOptions(
            save_decision_policy=policies.AnySavePolicy(
                [
                    policies.FixedIntervalPolicy(save_interval_steps),
                    policies.PreemptionCheckpointingPolicy(),
                ]
            ),
            preservation_policy=policies.LatestN(max_to_keep),
            enable_async_checkpointing=True,
            cleanup_tmp_directories=True,
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=(_STATE, _EXTRA)
        )

    def should_save(self, step: int) -> bool:
        """Whether `save(step, ...)` without `force` would write a checkpoint.

        **Arguments:**

        - `step`: the current training step.

        **Returns:**

        True on the save cadence (and on preemption), False otherwise or when a checkpoint at
        `step` or later already exists.
        """
        return self._manager.should_save(step)

    def save(self, step: int, state: Any, extra: dict, *, force: bool = False) -> bool:
        """Starts an asynchronous save of `state` and `extra` at `step`.

        Must be called by every process. The previous save is awaited first.

        **Arguments:**

        - `step`: the training step the checkpoint is for.
        - `state`: a pytree of `jax.Array`s.
        - `extra`: JSON-serialisable metadata. It comes back as JSON does: tuples as lists,
          dict keys as strings.
        - `force`: save even when `should_save(step)` is false (e.g. on SIGTERM or at the
          end of training).

        **Returns:**

        Whether a save was started. A `step` that is already saved is skipped (False).

        **Raises:**

        `CheckpointSaveError` as `wait` does, for this save or the previous one.
        """
        try:
            json.dumps(extra)
        except (TypeError, ValueError) as e:
            raise TypeError(f"Checkpoint `extra` must be JSON-serialisable: {e}") from e
        if force and step in self._manager.all_steps():
            logger.info("Checkpoint for step %d already exists in %s.", step, self.directory)
            return False
        args = ocp.args.Composite(
            **{_STATE: ocp.args.StandardSave(state), _EXTRA: ocp.args.JsonSave(extra)}
        )
        self.wait()
        self._pending = None if step in self._manager.all_steps() else step
        try:
            return self._manager.save(step, args=args, force=force)
        except Exception as error:  # e.g. no space for the step directory
            raise self._save_error(error) from error

    def restore_latest(self, abstract_state: Any) -> tuple[int, Any, dict] | None:
        """Restores the newest readable checkpoint.

        Unreadable newer checkpoints are reported with a warning and renamed to
        `<step>.corrupt`, so that later saves at those steps succeed and they stay around
        for inspection. Must be called by every process.

        **Arguments:**

        - `abstract_state`: a pytree of `jax.ShapeDtypeStruct`s (with `.sharding`) or arrays,
          with the structure of the saved `state`; the result has its shapes, dtypes and
          shardings.

        **Returns:**

        `(step, state, extra)`, or None when there is no checkpoint.

        **Raises:**

        `CheckpointError` when checkpoints exist but none can be restored.
        """
        self.wait()
        target = jax.tree.map(_abstract, abstract_state)
        failures = {}
        for step in sorted(self._manager.all_steps(), reverse=True):
            try:
                restored = self._restore(step, target)
            except Exception as e:  # noqa: BLE001 -- any read failure means "corrupt"
                failures[step] = e
                continue
            for bad_step, error in failures.items():
                logger.warning(
                    "Checkpoint at step %d in %s is unreadable (%s); falling back to step %d.",
                    bad_step, self.directory, _describe(error), step,
                )
            self._quarantine(list(failures))
            return restored
        if failures:
            for step, error in failures.items():
                logger.warning("Checkpoint at step %d in %s is unreadable (%s).", step, self.directory,
                               _describe(error))
            raise CheckpointError(
                f"All {len(failures)} checkpoints in {self.directory} are unreadable (steps "
                f"{', '.join(map(str, failures))}); refusing to start from step 0. Move the run "
                "directory aside to start afresh."
            )
        return None

    def latest_step(self) -> int | None:
        """**Returns:** the newest saved step (including an in-flight save), or None."""
        return self._manager.latest_step()

    def wait(self) -> None:
        """Blocks until the in-flight save (if any) is on disk.

        **Raises:**

        `CheckpointSaveError` when it failed: the partial checkpoint is removed, the earlier ones
        are intact, and this `Checkpointer` is closed.
        """
        if self._failed:
            return
        try:
            self._manager.wait_until_finished()
        except Exception as error:  # any failed write
            raise self._save_error(error) from error

    def close(self) -> None:
        """Finishes the in-flight save and releases orbax's resources (raises as `wait`)."""
        try:
            self.wait()
        finally:
            if not self._failed:
                self._manager.close()

    def _save_error(self, error: Exception) -> CheckpointSaveError:
        """Stops orbax's background writes, removes what the failed save of a new step left (finished
        or not), and says what to do."""
        self._failed, step = True, self._pending
        try:
            self._manager.close()
        except Exception:  # the same failure, already in hand
            logger.debug("orbax's close after the failed save", exc_info=True)
        for thread in threading.enumerate():  # the other writes of the save may still be running
            if type(thread).__module__.startswith("orbax.") and thread is not threading.current_thread():
                threading.Thread.join(thread, timeout=_WRITE_TIMEOUT_S)
        if jax.process_index() == 0 and step is not None:
            for path in [self.directory / str(step), *self.directory.glob(f"{step}{_UNFINISHED}*")]:
                shutil.rmtree(path, ignore_errors=True)
        kept = saved_steps(self.directory)[0]
        resume = f"rerun the same command to resume from step {kept[-1]}" if kept else "rerun the same command"
        if _disk_full(error):
            fix = (f"the disk is full. Free space there, or keep fewer checkpoints (train.keep_checkpoints, "
                   f"now {self._max_to_keep}), then {resume}")
        else:
            fix = f"{_describe(error)}. Check that the disk is writable, then {resume}"
        return CheckpointSaveError(f"Could not write the checkpoint of step {step} in {self.directory}: {fix}.")

    def _restore(self, step: int, target: Any) -> tuple[int, Any, dict]:
        args = ocp.args.Composite(
            **{_STATE: ocp.args.StandardRestore(target), _EXTRA: ocp.args.JsonRestore()}
        )
        restored = self._manager.restore(step, args=args)
        return step, restored[_STATE], restored[_EXTRA]

    def _quarantine(self, steps: list[int]) -> None:
        """Renames unreadable step directories out of orbax's sight (primary process)."""
        if not steps:
            return
        if jax.process_index() == 0:
            for step in steps:
                path = self.directory / str(step)
                destination = self.directory / f"{step}{_CORRUPT_SUFFIX}"
                for n in itertools.count(1):
                    if not destination.exists():
                        break
                    destination = self.directory / f"{step}{_CORRUPT_SUFFIX}{n}"
                path.rename(destination)
                logger.warning("Moved unreadable checkpoint %s to %s.", path, destination)
        ocp.multihost.sync_global_processes(f"stepjax_quarantine_{next(_barrier_ids)}")
        self._manager.reload()
