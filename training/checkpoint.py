"""Checkpoints: one directory per save, written atomically, describing itself.

    <run_dir>/checkpoints/step_0001000/
        model.safetensors   raw weights           ema.safetensors   EMA weights
        train_state.pt      optimizer, step, data position (loaded with weights_only=True)
        config.yaml         the resolved training config
        meta.json           stage, model family / preset / config, step, code revision, autoencoder, conditioning
    <run_dir>/checkpoints/latest   name of the newest complete checkpoint, updated last

A save goes to a temporary sibling directory that is renamed into place once
every file is fsynced, so a crash mid-save never leaves a half-written
checkpoint under a real name.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from models.linear import portable_state_dict

FORMAT = "flowdit-checkpoint-v1"
REQUIRED = ("model.safetensors", "train_state.pt", "meta.json", "config.yaml")


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete, or not what the caller expects."""


def code_revision() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _state_dict(model: torch.nn.Module | dict) -> dict[str, torch.Tensor]:
    """Tensors to save: on the CPU, contiguous, without TE's pickled FP8 state (models/linear.py)."""
    if not isinstance(model, dict):  # a module, not an already gathered FSDP full state dict
        model = getattr(model, "module", model).state_dict()  # unwrap DDP
    return {k: v.detach().contiguous().cpu() for k, v in portable_state_dict(model).items()}


def save_checkpoint(
    ckpt_root: str | os.PathLike,
    step: int,
    model: torch.nn.Module | dict,
    ema: torch.nn.Module | dict | None,
    train_state: dict[str, Any],
    config_yaml: str,
    meta: dict[str, Any],
) -> Path:
    """Write ``ckpt_root/step_XXXXXXX`` atomically and point ``latest`` at it."""
    root = Path(ckpt_root)
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:07d}"
    final = root / name
    tmp = root / f".tmp-{name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file(_state_dict(model), tmp / "model.safetensors")
    _fault_injection_pause()
    if ema is not None:
        save_file(_state_dict(ema), tmp / "ema.safetensors")
    torch.save(train_state, tmp / "train_state.pt")
    (tmp / "config.yaml").write_text(config_yaml)
    (tmp / "meta.json").write_text(json.dumps({"format": FORMAT, **meta, "step": step, "has_ema": ema is not None}, indent=2))
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    _fsync_dir(tmp)
    if final.exists():  # re-saving the same step (e.g. after a resume): replace it whole
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(root)
    latest_tmp = root / "latest.tmp"
    latest_tmp.write_text(name + "\n")
    os.replace(latest_tmp, root / "latest")
    return final


def _fault_injection_pause() -> None:
    """Fault-injection hook for tests/reliability: stall mid-save so a kill lands inside a write."""
    pause = float(os.environ.get("FLOWDIT_FAULT_SAVE_PAUSE", "0") or 0)
    if pause > 0:
        import time

        time.sleep(pause)


def remove_partial_saves(ckpt_root: str | os.PathLike) -> list[Path]:
    """Delete temporary directories left by saves that were killed before their rename."""
    root = Path(ckpt_root)
    stale = [p for p in root.glob(".tmp-step_*") if p.is_dir()] if root.is_dir() else []
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return stale


def list_checkpoints(ckpt_root: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under ``ckpt_root``, oldest first."""
    root = Path(ckpt_root)
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step_*") if p.is_dir() and all((p / f).exists() for f in REQUIRED)]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


def latest_checkpoint(ckpt_root: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint: the ``latest`` pointer if valid, else a scan."""
    root = Path(ckpt_root)
    pointer = root / "latest"
    if pointer.is_file():
        cand = root / pointer.read_text().strip()
        if cand.is_dir() and all((cand / f).exists() for f in REQUIRED):
            return cand
    found = list_checkpoints(root)
    return found[-1] if found else None


def prune_checkpoints(ckpt_root: str | os.PathLike, keep_last: int, keep_every: int = 0) -> None:
    """Delete all but the newest ``keep_last`` checkpoints (and every ``keep_every``-th step)."""
    found = list_checkpoints(ckpt_root)
    for p in found[: max(0, len(found) - keep_last)]:
        step = int(p.name.split("_")[1])
        if keep_every and step % keep_every == 0:
            continue
        shutil.rmtree(p, ignore_errors=True)


def resolve(path: str | os.PathLike) -> Path:
    """A checkpoint directory from what a user is likely to pass: the directory itself,
    a ``checkpoints/latest`` pointer, a ``checkpoints`` folder or a run directory (newest inside)."""
    p = Path(path)
    if p.is_file() and p.name == "latest":
        p = p.parent
    if (p / "meta.json").is_file():
        return p
    for root in (p, p / "checkpoints"):
        if (root / "latest").is_file() or list(root.glob("step_*")):
            found = latest_checkpoint(root)
            if found is not None:
                return found
    return p  # read_meta says what is wrong with it


def read_meta(ckpt_dir: str | os.PathLike) -> dict[str, Any]:
    ckpt_dir = resolve(ckpt_dir)
    path = Path(ckpt_dir) / "meta.json"
    if not path.is_file():
        raise CheckpointError(
            f"{ckpt_dir} is not a checkpoint directory of this project (no meta.json). "
            "Pass a folder like runs/<run>/checkpoints/step_0001000."
        )
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: checkpoint format {meta.get('format')!r}, expected {FORMAT!r}")
    return meta


def load_weights(ckpt_dir: str | os.PathLike, ema: bool = False) -> dict[str, torch.Tensor]:
    """Weights from safetensors (never pickle)."""
    name = "ema.safetensors" if ema else "model.safetensors"
    path = resolve(ckpt_dir) / name
    if not path.is_file():
        raise CheckpointError(f"{path} is missing" + (" (this checkpoint was saved without EMA)" if ema else ""))
    try:
        return load_file(path)
    except Exception as e:  # truncated or corrupt file
        raise CheckpointError(f"{path} cannot be read ({e}); it is truncated or corrupt. Resume from an older checkpoint.") from e


def load_train_state(ckpt_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(ckpt_dir) / "train_state.pt"
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(
            f"{path} cannot be loaded safely ({type(e).__name__}: {e}). Only tensors and plain containers are "
            "accepted (weights_only=True); the file is corrupt, truncated, or not from this project."
        ) from e
