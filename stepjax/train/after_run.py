"""SIGUSR1 to a command that trains a sequence of runs (the study, the lottery): finish the run in
progress, then stop.

The run in progress is not interrupted: it trains to its end, is evaluated and filed as usual; no
run is started after it, and the command ends with exit status 3 (`stepjax.errors.STOPPED`):
rerunning it goes on with the next pending run. Send the signal to that command's own process
(``pkill -USR1 -f stepjax.study``, ``pkill -USR1 -f stepjax.analysis.lottery``), not to its process
group: a training process of the study keeps SIGUSR1's default action, which ends it.
"""

from __future__ import annotations

import logging
import signal

SIGNAL = signal.SIGUSR1
_log = logging.getLogger("stepjax")


class StopAfterRun:
    """While open (a context manager), records whether SIGUSR1 asked to stop after the current run.

    **Attributes:**

    - `requested`: True once the signal has arrived; a command checks it before it starts a run.
    """

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self) -> StopAfterRun:
        self._previous = signal.signal(SIGNAL, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        signal.signal(SIGNAL, self._previous)

    def _handle(self, signum, frame):
        if not self.requested:
            _log.warning("SIGUSR1 received: the run in progress finishes and is filed; no further run starts "
                         "(rerun the same command to go on).")
        self.requested = True
