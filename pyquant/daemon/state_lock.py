"""The state directory's lock: one process at a time runs a journal, and others can find it.

``pyquant run --state DIR`` holds an exclusive ``flock`` on ``DIR/daemon.lock`` for its whole
life and writes its pid there. The kernel drops the lock when the process dies, even by
``kill -9``, so a stale pid in the file is never mistaken for a live holder.
``pyquant flatten --state DIR`` uses ``holder()`` to tell whether a daemon runs on the
directory: if so it latches the halt and signals that daemon (SIGUSR1) instead of opening a
second trading desk on the same journal.

Usage::

    lock = StateLock(state_dir)
    lock.acquire()            # StateLocked(pid) when another process holds it
    ...
    lock.release()
    pid = StateLock(state_dir).holder()   # None when nobody holds it
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from pyquant.errors import PyquantError

LOCK_NAME = "daemon.lock"


class StateLocked(PyquantError):
    """Another live process holds the state directory."""

    def __init__(self, path: Path, pid: int | None) -> None:
        who = f"process {pid}" if pid is not None else "another process"
        super().__init__(f"state directory {path.parent} is in use by {who} ({path})")
        self.pid = pid


class StateLock:
    """An exclusive, crash-safe lock on a state directory (see the module docstring)."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock and write our pid.

        Raises:
            StateLocked: another live process holds it (its pid is named).
        """
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StateLocked(self.path, self._read_pid()) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        """Drop the lock (the file stays; its pid is stale without the lock)."""
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def holder(self) -> int | None:
        """Return the pid of the live process holding the lock, or None when it is free."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = self._read_pid()
            return pid if pid is not None else -1
        else:
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        finally:
            os.close(fd)

    def _read_pid(self) -> int | None:
        try:
            text = self.path.read_text().strip()
        except OSError:
            return None
        return int(text) if text.isdigit() else None

    def __enter__(self) -> StateLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


__all__ = ["LOCK_NAME", "StateLock", "StateLocked"]
