"""One writer per directory: the lock that training, the study, the lottery and the evaluation take.

The lock is the file ``<dir>/writer.lock``, holding ``{"host", "pid", "since"}`` of its holder and
kept locked with `fcntl.flock` while the holder runs; the holder deletes it when it stops. A second
writer is refused with one line naming the holder and the fix. The kernel releases the `flock` of a
process that dies, so a lock file left by a dead process on the same host is taken over (with a
warning); one left by a process on another host is refused, since its holder may still run there.
Where the file system has no `flock`, a holder on this host counts as alive while its pid is.
Readers (reports, analysis) never take the lock and are never blocked by it.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import logging
import os
import socket
from pathlib import Path

from stepjax.errors import UserError

LOCK_FILE = "writer.lock"
CLAIMS = ".claims"  # <parent>/.claims/<run>: the lock of the process that trains the run
log = logging.getLogger("stepjax")


class WorkdirLocked(UserError):
    """Another process writes to the directory."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _kernel_lock(fd: int, mode: int = fcntl.LOCK_EX) -> bool | None:
    """Take the `flock` of `fd` (exclusive, or shared to only look): True when taken, False when
    another process holds it, None when the file system does not support it."""
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
    except OSError as error:
        if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        return None
    return True


def _read_holder(fd: int) -> dict:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 4096).decode(errors="replace")
    try:
        holder = json.loads(text)
    except json.JSONDecodeError:
        return {}
    return holder if isinstance(holder, dict) else {}


def _describe(holder: dict) -> str:
    return (f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, "
            f"since {holder.get('since', '?')}")


def _free(holder: dict, kernel: bool | None) -> bool:
    """Whether a lock file naming `holder` (empty: none) whose `flock` we got (`kernel`) is free."""
    if not holder:
        return True
    if holder.get("host") != socket.gethostname():
        return False  # its process may still run there, out of our sight
    if kernel:
        return True  # the kernel freed its flock: the process is gone
    return not _pid_alive(int(holder.get("pid", 0)))


class WorkdirLock:
    """The writer's lock of one directory (not re-entrant; one per process and directory).

    **Arguments:**

    - `directory`: the directory to lock (created if missing).
    """

    def __init__(self, directory: str | os.PathLike):
        self.path = Path(directory) / LOCK_FILE
        self._fd = None

    def acquire(self) -> None:
        """Take the lock, or raise `WorkdirLocked` naming the holder and the fix."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while self._fd is None:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                if self._try(fd):
                    self._fd = fd
            finally:
                if self._fd is None:
                    os.close(fd)

    def _try(self, fd: int) -> bool:
        """Whether `fd` (the lock file, opened) is now ours; False: the file was replaced, try again."""
        kernel = _kernel_lock(fd)
        holder = _read_holder(fd)
        if kernel is False or not _free(holder, kernel):
            raise WorkdirLocked(
                f"{self.path.parent} is in use by {_describe(holder)} (lock {self.path}). Wait for it to "
                "finish, stop it, or use another workdir; if that process no longer runs, delete the lock file."
            )
        try:
            if os.fstat(fd).st_ino != os.stat(self.path).st_ino:
                return False  # its holder deleted it after we opened it
        except FileNotFoundError:
            return False
        if holder:
            log.warning("Took over the lock of %s: %s, which no longer holds it.", self.path.parent, _describe(holder))
        now = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": now}).encode(), 0)
        return True

    def release(self) -> None:
        """Delete the lock file and let it go."""
        if self._fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self._fd)
            self._fd = None


def lock_holder(directory: str | os.PathLike) -> dict | None:
    """Who holds the writer's lock of `directory` now, read without taking it.

    **Returns:**

    ``{"host", "pid", "since"}`` of a holder that still holds it (one on another host counts as
    holding it, as `WorkdirLock` does), else None: no lock file, or one left by a process gone.
    """
    path = Path(directory) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        holder = _read_holder(fd)
        kernel = _kernel_lock(fd, fcntl.LOCK_SH)  # refused while the holder keeps its exclusive flock
    finally:
        os.close(fd)
    held = kernel is False or not _free(holder, kernel)
    return {"host": "?", "pid": "?", "since": "?", **holder} if held else None


@contextlib.contextmanager
def hold_workdir(directory: str | os.PathLike):
    """Hold the writer's lock of `directory` for the duration of a ``with`` block.

    In a run of several processes, process 0 takes it for all of them (every process must enter the
    block); when it is refused, every process raises `WorkdirLocked`.

    **Arguments:**

    - `directory`: the directory to lock (created if missing).
    """
    import jax

    lock = WorkdirLock(directory)
    refusal = None
    if jax.process_index() == 0:
        try:
            lock.acquire()
        except WorkdirLocked as error:
            refusal = error
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        if multihost_utils.broadcast_one_to_all(int(refusal is not None)) and refusal is None:
            refusal = WorkdirLocked(f"{directory} is in use by another writer (process 0 could not lock it).")
    if refusal is not None:
        raise refusal
    try:
        yield lock
    finally:
        lock.release()


def claim_dir(workdir: str | os.PathLike) -> Path:
    """Where a process claims the run of `workdir` while it trains it: ``<parent>/.claims/<name>``."""
    return Path(workdir).parent / CLAIMS / Path(workdir).name


@contextlib.contextmanager
def claimed(workdir: str | os.PathLike):
    """Hold this process's claim on `workdir` (a run, or an analysis named beside the runs) for the
    block, so that several processes can work through one list of runs (the study's and the
    lottery's lanes); yields False, holding nothing, when another live process has claimed it."""
    claim = WorkdirLock(claim_dir(workdir))
    try:
        claim.acquire()
    except WorkdirLocked:
        yield False
        return
    try:
        yield True
    finally:
        claim.release()
