"""Pre-emption signals, caught from a run's first instant.

The entry points call :func:`catch` before their slow imports, so a SIGTERM or SIGUSR1 that
arrives while a job is still starting (SLURM pre-empts whenever it likes) is remembered instead
of killing the process: the trainer then exits with code 75 ("run again") before or after its
next step, with a checkpoint of what it trained. A second signal exits at once. No torch here:
importing this module must cost nothing.
"""
from __future__ import annotations

import os
import signal

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_received: list[int] = []
_previous: dict = {}


def _handle(signum, frame) -> None:
    if _received:
        os._exit(128 + signum)  # the user insists: no checkpoint, no cleanup
    _received.append(signum)


def catch() -> None:
    """Remember the first stop signal from now on (idempotent)."""
    for sig in STOP_SIGNALS:
        if signal.getsignal(sig) is not _handle:
            _previous[sig] = signal.signal(sig, _handle)


def received() -> int | None:
    """The first stop signal received, if any."""
    return _received[0] if _received else None


def release() -> None:
    """The handlers from before :func:`catch`, and forget what was received (a run inside a longer process has ended)."""
    for sig, handler in _previous.items():
        signal.signal(sig, handler)
    _previous.clear()
    _received.clear()
