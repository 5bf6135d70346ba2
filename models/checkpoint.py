"""The checkpoint format: one folder per save that describes itself; read here, written here.

    <run_dir>/checkpoints/step_0001000/
        model.safetensors   raw weights           ema.safetensors   EMA weights
        train_state.pt      optimizer, step, data position (loaded with weights_only=True)
        config.yaml         the resolved training config
        meta.json           stage, model family / preset / config, step, code revision, autoencoder,
                            conditioning, sampling defaults
    <run_dir>/checkpoints/latest   name of the newest complete checkpoint, updated last

An init checkpoint (``reparameterize.py``'s output) is the same folder with ``model.safetensors``,
``meta.json`` and a report. Everything that only reads checkpoints (the sampler, the app, the
evaluator, ``reparameterize.py``, the trainer's resume and ``stage.init_from``) goes through this
module, so it sits below ``inference/``; saving, pruning and the training state belong to
``training/checkpoint.py``. Weights are safetensors: loading a checkpoint never runs code.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import zipfile
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from models.atomic import atomic_directory
from models.linear import load_portable, portable_state_dict

FORMAT = "flowdit-checkpoint-v1"
REQUIRED = ("model.safetensors", "train_state.pt", "meta.json", "config.yaml")  # a complete training checkpoint


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete, or not what the caller expects."""


def code_revision() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# ---------------------------------------------------------------- finding checkpoints
STEP_DIR = re.compile(r"step_(\d+)")


def step_of(path: Path) -> int:
    return int(STEP_DIR.fullmatch(path.name).group(1))


def step_dirs(ckpt_root: str | os.PathLike) -> list[Path]:
    """Every ``step_<n>`` folder under ``ckpt_root``, complete or not, oldest first."""
    root = Path(ckpt_root)
    found = [p for p in root.iterdir() if p.is_dir() and STEP_DIR.fullmatch(p.name)] if root.is_dir() else []
    return sorted(found, key=step_of)


def is_complete(path: Path) -> bool:
    return path.is_dir() and all((path / f).exists() for f in REQUIRED)


def list_checkpoints(ckpt_root: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under ``ckpt_root``, oldest first."""
    return [p for p in step_dirs(ckpt_root) if is_complete(p)]


def checkpoint_problem(path: Path) -> str | None:
    """Why the training checkpoint ``path`` cannot be resumed from, naming the file; None when every
    file it holds is there and readable (headers and archives checked, tensors not loaded)."""
    missing = [f for f in REQUIRED if not (path / f).is_file()]
    if missing:
        return f"{', '.join(missing)} missing"
    try:
        meta = read_meta(path)
    except CheckpointError as e:
        return str(e)
    if meta.get("step") != step_of(path):
        return f"meta.json says step {meta.get('step')}, the folder's name step {step_of(path)}"
    try:
        import yaml

        yaml.safe_load((path / "config.yaml").read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        return f"config.yaml cannot be read ({type(e).__name__})"
    for name in ("model.safetensors", "ema.safetensors") if meta.get("has_ema") else ("model.safetensors",):
        try:
            with safe_open(path / name, "pt"):
                pass
        except Exception as e:  # missing, truncated, not safetensors
            return f"{name} cannot be read ({e})"
    try:
        with zipfile.ZipFile(path / "train_state.pt") as z:
            bad = z.testzip()
        if bad is not None:
            return f"train_state.pt is damaged ({bad} fails its checksum)"
    except (OSError, zipfile.BadZipFile, EOFError) as e:
        return f"train_state.pt cannot be read ({e})"
    return None


def latest_checkpoint(ckpt_root: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint: the ``latest`` pointer if valid, else a scan."""
    root = Path(ckpt_root)
    pointer = root / "latest"
    if pointer.is_file():
        cand = root / pointer.read_text().strip()
        if is_complete(cand):
            return cand
    found = list_checkpoints(root)
    return found[-1] if found else None


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


# ---------------------------------------------------------------- reading
def read_meta(ckpt_dir: str | os.PathLike) -> dict[str, Any]:
    ckpt_dir = resolve(ckpt_dir)
    path = Path(ckpt_dir) / "meta.json"
    if not path.is_file():
        raise CheckpointError(
            f"{ckpt_dir} is not a checkpoint directory of this project (no meta.json). "
            "Pass a folder like runs/<run>/checkpoints/step_0001000."
        )
    try:
        meta = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); the checkpoint is damaged. Use an older checkpoint.") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: checkpoint format {meta.get('format') if isinstance(meta, dict) else None!r}, expected {FORMAT!r}")
    return meta


def load_weights(ckpt_dir: str | os.PathLike, ema: bool = False) -> dict[str, torch.Tensor]:
    """Weights from safetensors (never pickle), every value finite."""
    name = "ema.safetensors" if ema else "model.safetensors"
    path = resolve(ckpt_dir) / name
    if not path.is_file():
        raise CheckpointError(f"{path} is missing" + (" (this checkpoint was saved without EMA)" if ema else ""))
    try:
        weights = load_file(path)
    except Exception as e:  # truncated or corrupt file
        raise CheckpointError(f"{path} cannot be read ({e}); it is truncated or corrupt. Resume from an older checkpoint.") from e
    bad = [k for k, v in weights.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(f"{path} holds NaN or infinite values in {len(bad)} tensors ({', '.join(bad[:3])}, ...): the "
                              "weights diverged before this save. Use an older checkpoint.")
    return weights


def checkpoint_model(ckpt_dir: str | os.PathLike, meta: dict, use_ema: bool = True) -> nn.Module:
    """The model a checkpoint (with its ``meta``) describes, built with plain linears and its weights
    loaded: EMA when asked and saved. Every precision backend trains the same full-precision weights,
    so this is the model whatever ``precision.linear`` trained it. An adapter run's checkpoint gives
    its base (checked against the recorded sha256) with the adapters on (models/adapters.py)."""
    from models.presets import build_model

    if meta.get("adapter"):
        return adapter_checkpoint_model(ckpt_dir, meta, use_ema)

    model = build_model(meta["family"], meta["model_config"])
    load_portable(model, load_weights(ckpt_dir, ema=use_ema and meta.get("has_ema", False)))
    return model


# ---------------------------------------------------------------- adapter (LoRA) checkpoints
def base_record(base_dir: str | os.PathLike) -> dict:
    """What an adapter checkpoint records of its base: the folder, the weight file (EMA when saved) and its sha256."""
    from models.adapters import AdapterError, file_sha256

    base = resolve(base_dir)
    meta = read_meta(base)
    if meta.get("adapter"):
        raise AdapterError(f"{base} is itself an adapter checkpoint: merge it first (scripts/lora.py merge) to use it as a base")
    weights = "ema.safetensors" if meta.get("has_ema") else "model.safetensors"
    return {"path": str(base.resolve()), "weights": weights, "sha256": file_sha256(base / weights)}


def adapter_checkpoint_model(ckpt_dir: str | os.PathLike, meta: dict, use_ema: bool = True) -> nn.Module:
    """The base an adapter checkpoint names (its weight file checked against the recorded sha256) with
    the adapters on, unmerged (models/adapters.py)."""
    from models.adapters import LoraSpec, add_lora, file_sha256, load_adapter_state

    record = meta["adapter"]["base"]
    path = Path(record["path"])
    weights = path / record["weights"]
    if not weights.is_file():
        raise CheckpointError(f"the adapters' base checkpoint {path} is gone ({record['weights']} missing). Put it back, or use "
                              "a merged checkpoint (scripts/lora.py merge) that does not need it")
    if file_sha256(weights) != record["sha256"]:
        raise CheckpointError(f"the adapters' base {weights} changed since they were trained (sha256 differs from "
                              f"{record['sha256'][:16]}...): these adapters belong to the old weights")
    model = checkpoint_model(path, read_meta(path), use_ema=record["weights"] == "ema.safetensors")
    spec = LoraSpec.from_config(meta["adapter"])
    model = add_lora(model, spec)
    load_adapter_state(model, load_weights(ckpt_dir, ema=use_ema and meta.get("has_ema", False)))
    return model


# ---------------------------------------------------------------- writing
def checkpoint_meta(*, stage: str, stage_index: int, family: str, preset: str, model_config: dict, autoencoder: dict,
                    conditioning: dict, sampling: dict, **extra: Any) -> dict[str, Any]:
    """The meta.json of every checkpoint, whoever writes it (the trainer, reparameterize.py):
    what the sampler needs to rebuild and run the model with nothing else at hand."""
    revision = extra.pop("code_revision", None) or code_revision()
    return {"format": FORMAT, "stage": stage, "stage_index": int(stage_index), "family": family, "preset": preset,
            "model_config": model_config, "code_revision": revision, "autoencoder": autoencoder,
            "conditioning": conditioning, "sampling": sampling, **extra}


def tensors_of(model: nn.Module | dict) -> dict[str, torch.Tensor]:
    """Tensors to save: on the CPU, contiguous, without TE's pickled FP8 state (models/linear.py)."""
    if not isinstance(model, dict):  # a module, not an already gathered FSDP full state dict
        model = getattr(model, "module", model).state_dict()  # unwrap DDP
    return {k: v.detach().contiguous().cpu() for k, v in portable_state_dict(model).items()}


def write_checkpoint(final: str | os.PathLike, meta: dict[str, Any], model: nn.Module | dict, ema: nn.Module | dict | None = None,
                     files: dict[str, bytes | str] | None = None, write=None) -> Path:
    """Write a checkpoint folder atomically (a temporary sibling renamed into place; an existing one
    is replaced whole): weights as safetensors, ``meta.json`` (``has_ema`` set here), other
    ``files`` by name, and whatever ``write(tmp_dir)`` adds (the training state)."""
    final = Path(final)
    with atomic_directory(final) as tmp:
        save_file(tensors_of(model), tmp / "model.safetensors")
        if ema is not None:
            save_file(tensors_of(ema), tmp / "ema.safetensors")
        if write is not None:
            write(tmp)
        for name, content in (files or {}).items():
            (tmp / name).write_bytes(content.encode() if isinstance(content, str) else content)
        (tmp / "meta.json").write_text(json.dumps({**meta, "format": FORMAT, "has_ema": ema is not None}, indent=2))
    return final
