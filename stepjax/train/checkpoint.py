"""Checkpointing of training state with orbax.

One checkpoint is a step directory holding two items:

- `state`: a pytree of `jax.Array`s (an `nnx.State` of model and optimizer, or its pure-dict
  form), written with `StandardSave`, possibly sharded and from several processes;
- `extra`: JSON metadata (data-iterator state, config, best accuracy, epoch, ...).

Saves are asynchronous: `save` returns once the arrays are copied off the device (so the
caller may donate them to the next step) and the files are written in the background;
`wait`/`close` block until they are on disk. A checkpoint that cannot be read is never
silently replaced by a fresh start: `restore_latest` falls back to the newest readable one
with a warning, and raises if none is readable.
"""

import itertools
import json
import logging
import os
import pathlib
import re
from typing import Any

import jax
import orbax.checkpoint as ocp

logger = logging.getLogger(__name__)

_STATE = "state"
_EXTRA = "extra"
_CORRUPT_SUFFIX = ".corrupt"
_barrier_ids = itertools.count()


def _describe(error: Exception) -> str:
    """`Type: message` without the tensorstore spec that orbax appends to read errors."""
    message = re.sub(r"\s*\[tensorstore_spec=.*", "", str(error), flags=re.DOTALL)
    return f"{type(error).__name__}: {message}"


def _abstract(leaf: Any) -> Any:
    """Describes an array by shape, dtype and sharding.

    (`ocp.utils.to_shape_dtype_struct` would drop the sharding of typed PRNG keys.)
    """
    if isinstance(leaf, jax.Array):
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding)
    return leaf


class CheckpointError(RuntimeError):
    """Raised when checkpoints exist but none of them can be restored."""


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
        return self._manager.save(step, args=args, force=force)

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
            details = "\n".join(f"  step {s}: {_describe(e)}" for s, e in failures.items())
            raise CheckpointError(
                f"All {len(failures)} checkpoints in {self.directory} are unreadable; "
                f"refusing to start from step 0. Move the directory aside to start "
                f"afresh.\n{details}"
            )
        return None

    def latest_step(self) -> int | None:
        """**Returns:** the newest saved step (including an in-flight save), or None."""
        return self._manager.latest_step()

    def wait(self) -> None:
        """Blocks until the in-flight save (if any) is on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Finishes the in-flight save and releases orbax's resources."""
        self._manager.close()

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
