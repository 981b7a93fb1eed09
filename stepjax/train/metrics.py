"""Metric writers (JSONL and TensorBoard), a progress bar and the final run summary.

`workdir/metrics.jsonl` holds one JSON object per `MetricWriter.write` call:
`{"step": int, "split": str, "time": unix seconds, **metrics}` with floats, or lists of floats
for per-block values. TensorBoard event files go to `workdir/tb`, one scalar per scalar metric
under the tag `f"{split}/{key}"` (`stepjax.train.events`). Both are on disk when `write` returns.
"""

import json
import logging
import math
import os
import time
from typing import Any

import numpy as np
import tqdm

from stepjax.train.events import EventFile

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tb"
_RESERVED = ("step", "split", "time")
_SUMMARY_KEYS = (
    "best_accuracy", "best_epoch", "last_accuracy", "last_epoch",
    "steps", "wall_time_s", "images_per_sec",
)


def _to_json_value(key: str, value: Any) -> float | list:
    """Converts a scalar or array-like (numpy, jax, Python) to a float or a nested list."""
    array = np.asarray(value)
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
        raise TypeError(f"Metric {key!r} must be numeric, got {type(value).__name__}.")
    array = array.astype(np.float64)
    return float(array) if array.ndim == 0 else array.tolist()


def _drop_partial_last_line(path: str) -> None:
    """Truncates an unterminated last line (left by a killed writer) so appends stay valid."""
    if not os.path.exists(path):
        return
    with open(path, "rb+") as f:
        data = f.read()
        if data and not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)
            logger.warning("Dropped a truncated last line from %s.", path)


class MetricWriter:
    """Appends metrics to `workdir/metrics.jsonl` and TensorBoard, flushing on every write.

    **Arguments:**

    - `workdir`: the run directory (created if missing).
    - `enabled`: False on non-primary processes: then nothing is created or written.
    """

    def __init__(self, workdir: str | os.PathLike, *, enabled: bool = True):
        self.enabled = enabled
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        self.path = os.path.join(workdir, METRICS_FILE)
        _drop_partial_last_line(self.path)
        self._file = open(self.path, "a", encoding="utf-8")
        tb_dir = os.path.join(workdir, TENSORBOARD_DIR)
        os.makedirs(tb_dir, exist_ok=True)
        # One file per writer; the suffix keeps a quick restart from overwriting the last one.
        suffix = f".{os.getpid()}.{time.time_ns()}"
        self._tb = EventFile(os.path.join(tb_dir, "events"), suffix=suffix)

    def write(self, step: int, metrics: dict[str, Any], *, split: str) -> None:
        """Writes one record.

        **Arguments:**

        - `step`: the training step the metrics belong to.
        - `metrics`: name -> scalar, or array-like of values (e.g. one per block; JSONL only).
        - `split`: e.g. `"train"` or `"test"`; prefixes the TensorBoard tags.
        """
        if not self.enabled:
            return
        clashes = [key for key in metrics if key in _RESERVED]
        if clashes:
            raise ValueError(f"Metric names {clashes} clash with the reserved keys {_RESERVED}.")
        values = {key: _to_json_value(key, value) for key, value in metrics.items()}
        now = time.time()
        record = {"step": int(step), "split": split, "time": now, **values}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        scalars = {f"{split}/{key}": value for key, value in values.items() if isinstance(value, float)}
        if scalars:
            self._tb.write_scalars(int(step), scalars, wall_time=now)

    def close(self) -> None:
        """Flushes and closes the files."""
        if self.enabled:
            self._file.close()
            self._tb.close()


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """Reads a `metrics.jsonl` file.

    **Arguments:**

    - `path`: the file.

    **Returns:**

    The records in file order. A truncated last line (a killed process) is skipped.

    **Raises:**

    `ValueError` naming the file and line when any other line is not valid JSON.
    """
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if number == len(lines):  # no newline after it: a write was cut short
                logger.warning("Skipping truncated last line %d of %s.", number, path)
                continue
            raise ValueError(f"{path}:{number}: not a JSON record ({e}).") from e
    return records


def drop_records_after(path: str | os.PathLike, step: int) -> int:
    """Removes the records of the steps after `step` from a `metrics.jsonl` file, so that a run
    resumed at `step` logs each step once.

    **Arguments:**

    - `path`: the file (missing: nothing to do).
    - `step`: the step the run resumes from.

    **Returns:**

    How many records were dropped. The file is replaced atomically, and only when some are.
    """
    if not os.path.exists(path):
        return 0
    records = read_metrics(path)
    kept = [r for r in records if r["step"] <= step]
    if len(kept) < len(records):
        temporary = f"{path}.tmp"
        with open(temporary, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)
        os.replace(temporary, path)
    return len(records) - len(kept)


class Progress:
    """A tqdm progress bar over training steps showing loss, accuracy, images/s and ETA.

    **Arguments:**

    - `total_steps`: the step the run ends at.
    - `initial_step`: the step the run (re)starts from.
    - `enabled`: False on non-primary processes: then nothing is shown.
    - `desc`: the bar's label.
    """

    def __init__(
        self,
        total_steps: int,
        initial_step: int = 0,
        *,
        enabled: bool = True,
        desc: str = "train",
    ):
        self._bar = tqdm.tqdm(
            total=total_steps,
            initial=initial_step,
            desc=desc,
            unit="step",
            disable=not enabled,
            dynamic_ncols=True,
            mininterval=1.0,
        )

    def update(self, step: int, *, loss: float, accuracy: float, images_per_sec: float) -> None:
        """Moves the bar to `step` and shows the latest training statistics.

        **Arguments:**

        - `step`: the current training step (absolute, not an increment).
        - `loss`, `accuracy`, `images_per_sec`: shown next to the bar.
        """
        self._bar.set_postfix(
            {"loss": f"{loss:.4f}", "acc": f"{accuracy:.4f}", "img/s": f"{images_per_sec:.1f}"},
            refresh=False,
        )
        self._bar.update(step - self._bar.n)

    def close(self) -> None:
        """Closes the bar."""
        self._bar.close()


def _format_duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m {secs:02d}s" if hours else f"{minutes}m {secs:02d}s"


def _format_accuracy(accuracy: float | None, epoch: int | float | None) -> str:
    if accuracy is None or math.isnan(accuracy):
        return "n/a"
    where = "" if epoch is None else f" (epoch {epoch})"
    return f"{100 * accuracy:.2f} %{where}"


def format_summary(summary: dict) -> str:
    """Renders the final run summary as a few lines.

    **Arguments:**

    - `summary`: with keys `best_accuracy`, `best_epoch`, `last_accuracy`, `last_epoch`
      (test accuracy as a fraction in [0, 1] and the epoch it was measured at; None when
      there was no evaluation), `steps`, `wall_time_s`, `images_per_sec`.

    **Returns:**

    The text, without a trailing newline.
    """
    missing = [key for key in _SUMMARY_KEYS if key not in summary]
    if missing:
        raise KeyError(f"Run summary lacks {missing}; expected keys {_SUMMARY_KEYS}.")
    best = _format_accuracy(summary["best_accuracy"], summary["best_epoch"])
    last = _format_accuracy(summary["last_accuracy"], summary["last_epoch"])
    duration = _format_duration(summary["wall_time_s"])
    speed = f"{summary['images_per_sec']:.1f} images/s"
    return "\n".join(
        [
            f"best test accuracy  {best}",
            f"last test accuracy  {last}",
            f"training            {summary['steps']} steps in {duration}, {speed}",
        ]
    )
