"""The failures stepjax explains in one line, and the exit status of each way a command ends.

A command (``python -m stepjax.main``, the study, the lottery, the evaluation) runs its work through
`run`: a `StepjaxError` ends it with one line on stderr that names the problem and the fix, and with
the error's `exit_status`; ``--debug`` shows the traceback instead. Any other exception is a bug and
keeps its traceback (exit status 1).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from typing import NoReturn

DONE = 0  # the work finished
CRASHED = 1  # an unexpected error (a traceback), or a study with failed runs
REFUSED = 2  # bad input (experiment, key, data file) or a refused workdir: nothing was trained or changed
STOPPED = 3  # stopped early (SIGTERM, SIGINT, train.halt_after_steps) with a checkpoint saved: rerun to resume
SAVE_FAILED = 4  # a checkpoint could not be written (e.g. a full disk); the earlier ones are kept
DIVERGED = 5  # the loss became NaN or infinite; the last good checkpoint is kept


class StepjaxError(Exception):
    """A failure reported in one line: the problem and the fix. `exit_status` says which kind."""

    exit_status = CRASHED


class UserError(StepjaxError, ValueError):
    """Bad input: an unknown experiment or key, a broken data file, a workdir that cannot be used as
    asked. Raised before anything is written."""

    exit_status = REFUSED


def run(work: Callable[[], int], *, debug: bool = False) -> int:
    """Run a command's work; a `StepjaxError` becomes its one-line message on stderr.

    **Arguments:**

    - `work`: the command, returning its exit status.
    - `debug`: let a `StepjaxError` propagate with its traceback.

    **Returns:**

    The exit status: `work`'s, or the error's `exit_status`.
    """
    try:
        return work()
    except StepjaxError as error:
        if debug:
            raise
        print(f"stepjax: {error}", file=sys.stderr, flush=True)
        return error.exit_status


def _not_from_orbax(record: logging.LogRecord) -> bool:
    return not (record.levelno >= logging.ERROR and f"{os.sep}orbax{os.sep}" in record.pathname)


class _CurrentStderr(logging.StreamHandler):
    """A handler writing to `sys.stderr` as it is when a line is logged, not as it was when logging
    was set up: a command run in-process (a test, a notebook) that swaps stderr and closes the old
    one leaves no handler writing to a closed stream."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value):
        pass


def setup_logging(debug: bool) -> None:
    """A command's logging: stepjax's INFO lines on stderr; the libraries' INFO chatter (absl, JAX's
    backend probing) and, without `debug`, their failure noise (`quiet_library_noise`) kept out.
    Replaces the root logger's plain stream handlers and keeps any other (a file, a test's capture)."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if type(h) in (logging.StreamHandler, _CurrentStderr)]:
        root.removeHandler(handler)  # the plain ones libraries install, and an earlier command's
    handler = _CurrentStderr()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    for noisy in ("absl", "jax._src.xla_bridge"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not debug:
        quiet_library_noise()


def quiet_library_noise() -> None:
    """Keep a failure's one-line message readable: drop orbax's error tracebacks (stepjax reports every
    failed save or restore itself) and the "Event loop is closed" tracebacks that orbax's background
    threads leave as unraisable exceptions. Not done under ``--debug``."""
    logging.getLogger("absl").addFilter(_not_from_orbax)
    sys.unraisablehook = lambda unraisable: None


def exit_process(status: int) -> NoReturn:
    """End the process with `status`. After a reported failure the interpreter's teardown is skipped:
    orbax's background threads would otherwise print pages of tracebacks after the message, which must
    stay the last line a user sees (every file is closed by then)."""
    sys.stdout.flush()
    sys.stderr.flush()
    if status in (REFUSED, SAVE_FAILED, DIVERGED):
        os._exit(status)
    sys.exit(status)
