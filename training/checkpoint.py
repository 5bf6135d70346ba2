"""Saving during training: a checkpoint per save (models/checkpoint.py's format), the ``latest``
pointer, pruning, and the training state (optimizer, step, data position).

A save goes to a temporary sibling directory that is renamed into place once every file is
fsynced (models/atomic.py), so a crash mid-save never leaves a half-written checkpoint under a
real name; ``latest`` is updated last.
"""
from __future__ import annotations

import os
import pickle
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import torch

from models.adapters import adapter_state
from models.atomic import atomic_write_text
from models.checkpoint import CheckpointError, list_checkpoints, step_of, write_checkpoint
from training.distributed import barrier
from training.logger import log


def save_checkpoint(
    ckpt_root: str | os.PathLike,
    step: int,
    model: torch.nn.Module | dict,
    ema: torch.nn.Module | dict | None,
    train_state: dict[str, Any],
    config_yaml: str,
    meta: dict[str, Any],
) -> Path:
    """Write ``ckpt_root/step_XXXXXXX`` atomically and point ``latest`` at it. A folder already there
    under that name (one a resume skipped as unusable, or a newer one than an explicit resume point)
    is kept aside as ``replaced-step_XXXXXXX-<time>``, never overwritten. A failed save leaves no
    trace and the older checkpoints as they were."""
    root = Path(ckpt_root)
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:07d}"
    if (root / name).exists():
        aside = root / f"replaced-{name}-{time.strftime('%Y%m%d-%H%M%S')}"
        os.rename(root / name, aside)
        log.warning("%s already existed; kept as %s", root / name, aside)
    try:
        final = write_checkpoint(root / name, {**meta, "step": step}, model, ema, files={"config.yaml": config_yaml},
                                 write=lambda tmp: torch.save(train_state, tmp / "train_state.pt"))
    except (OSError, RuntimeError) as e:  # a full disk ends in either (safetensors' serializer raises RuntimeError)
        kept = list_checkpoints(root)
        raise CheckpointError(
            f"saving the checkpoint of step {step} in {root} failed ({type(e).__name__}: {e}). Nothing of it was left behind"
            f"{f'; the newest checkpoint is still {kept[-1].name}' if kept else ''}. Free disk space (or fix the folder) and run "
            "the same command again: it resumes from the newest checkpoint."
        ) from e
    atomic_write_text(root / "latest", name + "\n")
    return final


def remove_partial_saves(ckpt_root: str | os.PathLike) -> list[Path]:
    """Delete temporary directories left by saves that were killed before their rename."""
    root = Path(ckpt_root)
    stale = [p for p in root.glob(".tmp-step_*") if p.is_dir()] if root.is_dir() else []
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return stale


def prune_checkpoints(ckpt_root: str | os.PathLike, keep_last: int, keep_every: int = 0) -> None:
    """Delete all but the newest ``keep_last`` checkpoints (and every ``keep_every``-th step)."""
    found = list_checkpoints(ckpt_root)
    for p in found[: max(0, len(found) - keep_last)]:
        if keep_every and step_of(p) % keep_every == 0:
            continue
        shutil.rmtree(p, ignore_errors=True)


def load_train_state(ckpt_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(ckpt_dir) / "train_state.pt"
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        # never pass on PyTorch's own advice here: it suggests a mode that would run the file's code
        what = ("it holds Python objects, not just tensors and plain containers" if isinstance(e, pickle.UnpicklingError)
                or "weights_only" in str(e) else f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        raise CheckpointError(
            f"{path} cannot be loaded safely ({what}). Only tensors and plain containers are accepted; the file is "
            "corrupt, truncated, or not from this project. Resume from an older checkpoint."
        ) from e


class Checkpointer:
    """The run's saves: weights and EMA (gathered first under FSDP), the optimizer and data position,
    the recorded config and meta; then pruning. Every rank calls ``save`` (FSDP gathers are collective);
    rank 0 writes, and nobody goes on before the save is complete. ``extra_state()``: more of the training state
    (tensors and plain containers: a training-only module's weights and optimizer)."""

    def __init__(self, ckpt_root: Path, meta: dict, config_yaml: str, keep_last: int, keep_every: int, parallel, ema, logger,
                 extra_state: Callable[[], dict] | None = None):
        self.root, self.meta, self.config_yaml, self.extra_state = ckpt_root, meta, config_yaml, extra_state
        self.keep_last, self.keep_every = keep_last, keep_every
        self.parallel, self.ema, self.logger = parallel, ema, logger
        self.last: Path | None = None  # on rank 0
        self.last_step: int | None = None  # on every rank: they must agree on whether to save

    def save(self, step: int, optimizer, batches_done: int, positions: dict | None = None) -> Path | None:
        p = self.parallel
        p.check_replicas(step)
        weights, ema_weights = p.full_weights(p.model), p.full_weights(self.ema)
        if self.meta.get("adapter"):  # an adapter run saves its adapters; the meta names the base they belong to
            weights, ema_weights = adapter_state(weights), adapter_state(ema_weights)
        optimizer_state = p.full_optimizer_state(optimizer)
        path = None
        if p.dist_info.is_main:
            state = {"optimizer": optimizer_state, "optimizer_format": p.optimizer_format, "step": step, "batches_done": batches_done,
                     "positions": positions or {}, **(self.extra_state() if self.extra_state else {})}
            path = save_checkpoint(self.root, step, weights, ema_weights, state, self.config_yaml, self.meta)
            prune_checkpoints(self.root, self.keep_last, self.keep_every)
            self.logger.write(f"saved checkpoint {path}")
        barrier(p.dist_info)  # nobody races ahead of (or reads) a half-finished save
        self.last, self.last_step = path, step
        return path

    def save_once(self, step: int, optimizer, batches_done: int, positions: dict | None = None) -> None:
        """Save ``step`` unless it is saved already (a periodic save just before a stop)."""
        if self.last_step != step:
            self.save(step, optimizer, batches_done, positions)
