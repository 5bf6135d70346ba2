"""Files and folders that appear complete or not at all: write to a temporary sibling, fsync, rename.

Every writer of lasting state uses these (checkpoints, init checkpoints, shards, manifests, data
preparation units), so a crash or a kill at any instant leaves either the old state or the new one
under the real name, never a half-written file. Temporary names start with a dot and carry the
writer's process id, so two writers never share one and a later run can tell its own leftovers.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: str | os.PathLike) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def atomic_write_bytes(path: str | os.PathLike, payload: bytes) -> None:
    """Write, fsync, rename; the temporary name is unique, so concurrent writers never share it."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode())


class AtomicFile:
    """A file built over time (a tar shard): write to ``tmp``, then ``commit()`` renames it to
    ``path`` after an fsync, or ``abort()`` removes it. Also a context manager (commit on success)."""

    def __init__(self, path: str | os.PathLike, tmp: str | os.PathLike | None = None):
        self.path = Path(path)
        self.tmp = Path(tmp) if tmp is not None else self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")

    def commit(self) -> Path:
        fsync_file(self.tmp)
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> Path:
        return self.tmp

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


@contextlib.contextmanager
def atomic_directory(final: str | os.PathLike, tmp: str | os.PathLike | None = None, replace: bool = True) -> Iterator[Path]:
    """Build a folder in a temporary sibling and rename it to ``final`` when the block succeeds (every
    file and the folder fsynced first); on an exception the temporary folder is removed. An existing
    ``final`` is replaced whole when ``replace``; otherwise it is kept and the new folder dropped (two
    writers building the same thing: the first to finish wins)."""
    final = Path(final)
    tmp = Path(tmp) if tmp is not None else final.with_name(f".tmp-{final.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                fsync_file(f)
        fsync_dir(tmp)
        if final.exists() and replace:
            shutil.rmtree(final)
        try:
            os.rename(tmp, final)
        except OSError:
            if replace or not final.exists():
                raise
            shutil.rmtree(tmp)  # another writer finished first
            return
        fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
