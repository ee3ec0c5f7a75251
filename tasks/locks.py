"""Locks that say who holds them: one computing run per artifact, one live process per run directory.

A lock is an advisory `flock` on a file, which the kernel releases when its holder exits in any way,
kill -9 included, so a dead holder never blocks the next run. The holder writes who it is into the file
(run, process, host, since) for the message the others get. `flock` works between processes on one machine
and, over NFSv4 and other shared file systems that carry POSIX locks, between machines; a file system
without locks (some FUSE mounts) lets two holders in, and the README says so.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class Busy(RuntimeError):
    """The lock is held by a live holder and waiting was not wanted."""


def me(run_id: str | None = None) -> dict[str, Any]:
    return {"run_id": run_id, "pid": os.getpid(), "host": socket.gethostname(),
            "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def describe(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "another process (it has not said which yet)"
    run = f"run {holder['run_id']}" if holder.get("run_id") else "a process"
    return f"{run} (pid {holder.get('pid')} on {holder.get('host')}, since {holder.get('since')})"


def read_holder(path: Path) -> dict[str, Any] | None:
    try:
        text = path.read_text()
        return json.loads(text) if text.strip() else None
    except (OSError, ValueError):
        return None


class Lock:
    """An exclusive lock on `path`, held from `acquire` to `release`."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def try_acquire(self, holder: dict[str, Any]) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        except BaseException:
            os.close(fd)
            raise
        # Say who holds it; others read this only while the lock is held.
        data = json.dumps(holder).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        self._fd = fd
        return True

    def acquire(self, holder: dict[str, Any], what: str, wait: bool = True, poll_s: float = 0.5,
                report_every_s: float = 60.0) -> float:
        """Take the lock; while another live process holds it, wait (saying so now and then) or raise Busy.
        Returns the seconds spent waiting."""
        t0 = time.monotonic()
        if self.try_acquire(holder):
            return 0.0
        other = read_holder(self.path)
        if other is None:  # it has the lock and is writing its name: give it a moment
            time.sleep(poll_s)
            other = read_holder(self.path)
        if not wait:
            raise Busy(f"{what} is busy: {describe(other)} holds it ({self.path})")
        log.warning("%s: %s holds it; waiting for it to finish", what, describe(other))
        last_report = t0
        while not self.try_acquire(holder):
            time.sleep(poll_s)
            if time.monotonic() - last_report >= report_every_s:
                last_report = time.monotonic()
                log.warning("%s: still waiting for %s (%.0f s)", what, describe(read_holder(self.path)),
                            last_report - t0)
        return time.monotonic() - t0

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)  # nobody holds it now
        except OSError:
            pass
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def holder_if_alive(path: Path) -> dict[str, Any] | None:
    """Who holds the lock at `path` now (None when nobody, a dead holder included)."""
    if not Path(path).exists():
        return None
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return read_holder(Path(path)) or {}
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


@contextlib.contextmanager
def holding(path: Path, holder: dict[str, Any], what: str, wait: bool = True) -> Iterator[float]:
    lock = Lock(path)
    waited = lock.acquire(holder, what, wait=wait)
    try:
        yield waited
    finally:
        lock.release()
