"""One trainer per run directory: an exclusive lock held for the run's life.

The lock is ``flock`` on ``<run_dir>/.lock`` (rank 0 holds it under torchrun), so the kernel
releases it when the holder dies, even by ``kill -9``. The file names the holder (host, pid,
start time): a second trainer refuses with that, and a trainer that finds the name of a process
that no longer runs takes the lock over with a note.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from training.config import ConfigError
from training.logger import log


class RunLock:
    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / ".lock"
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(fd)
            os.close(fd)
            raise ConfigError(
                f"{self.path.parent} is in use by another trainer ({_describe(holder)}). Two trainers on one run_dir would "
                "overwrite each other's checkpoints and metrics: wait for it to finish, stop it, or use another run_dir."
            ) from None
        previous = _read(fd)
        if previous and previous.get("pid") != os.getpid():
            log.info("took over the lock of %s, which is no longer running", _describe(previous))
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                  "started": time.strftime("%Y-%m-%d %H:%M:%S")}).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)  # the next trainer finds no holder to mention
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def _read(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0) or b"{}")
    except ValueError:
        return {}


def _describe(holder: dict) -> str:
    if not holder:
        return "holder unknown"
    return f"host {holder.get('host')}, pid {holder.get('pid')}, started {holder.get('started')}"
