"""Where a run starts: its own newest checkpoint (``resume``), another checkpoint's weights
(``stage.init_from``: the previous stage after reparameterize.py, or a run to fine-tune), or
scratch. Checkpoints of another stage, architecture or parallel layout are refused with what to
do instead."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch.nn as nn
from omegaconf import DictConfig

from models.checkpoint import checkpoint_problem, load_weights, read_meta, step_dirs
from models.linear import load_portable
from models.presets import config_from_dict
from training.checkpoint import load_train_state
from training.config import ConfigError
from training.logger import log


@dataclass
class ResumePoint:
    """Where a run starts: the checkpoint it resumes (None: a new run), the optimizer state to
    load, the step, the number of batches already read and where each data reader stood."""

    checkpoint: Path | None = None
    optimizer_state: dict | None = None
    step: int = 0
    batches_done: int = 0
    positions: dict | None = None
    repa: dict | None = None  # REPA's projector and its optimizer (training/repa.py), if the checkpoint's run had them


def model_config_changes(meta: dict, model_config: dict) -> dict:
    """{key: (checkpoint, now)} for every architecture setting that differs. Keys a checkpoint
    predates count as their default; pixels_per_latent only matters with micro-conditions."""
    old = asdict(config_from_dict(meta["family"], meta["model_config"]))
    changed = {k: (old.get(k), v) for k, v in model_config.items() if old.get(k) != v}
    if not model_config.get("micro_conditions") and not old.get("micro_conditions"):
        changed.pop("pixels_per_latent", None)
    return changed


def newest_usable(ckpt_root: Path) -> Path | None:
    """The newest checkpoint whose every file is there and readable; each newer one is named with why
    it was skipped. Checkpoints that exist but none usable stop the run: a new run there would bury them."""
    skipped = []
    for path in reversed(step_dirs(ckpt_root)):
        problem = checkpoint_problem(path)
        if problem is None:
            for bad, why in skipped:
                log.warning("skipping %s: %s", bad, why)
            return path
        skipped.append((path, problem))
    if skipped:
        raise ConfigError(
            f"{ckpt_root} holds {len(skipped)} checkpoint folder(s) and none can be resumed from:\n"
            + "\n".join(f"  {p.name}: {why}" for p, why in skipped)
            + "\nNothing was changed. Restore the missing files, resume from a folder elsewhere with resume=<path>, or "
            "start afresh in a new run_dir (or move checkpoints/ away)."
        )
    return None


def find_resume(cfg: DictConfig, ckpt_root: Path) -> Path | None:
    if cfg.resume == "auto":
        return newest_usable(ckpt_root)
    if cfg.resume in (None, "none"):
        if step_dirs(ckpt_root):
            raise ConfigError(
                f"{ckpt_root} already has checkpoints and resume=none: use resume=auto to continue that run, "
                "or a new run_dir to start another"
            )
        return None
    path = Path(cfg.resume)
    if not path.is_dir():
        raise ConfigError(f"resume={cfg.resume!r}: no such checkpoint directory")
    problem = checkpoint_problem(path)
    if problem:
        raise ConfigError(f"resume={cfg.resume}: cannot resume from it: {problem}")
    return path


def init_weights(model: nn.Module, ema: nn.Module | None, source: str, model_config: dict, family: str) -> None:
    """Start a fresh run from another checkpoint's weights (its EMA if it has one); ``ema`` None: the model only."""
    meta = read_meta(source)
    if meta.get("adapter"):
        raise ConfigError(f"stage.init_from={source} holds LoRA adapters, not a model: merge them into their base first "
                          f"(python scripts/lora.py merge {source} MERGED) and start from MERGED")
    mine = model_config.get("caption_channels")
    if meta.get("family") != family:
        hint = " Run `python reparameterize.py SOURCE OUT` and pass OUT as stage.init_from." if meta.get("family") == "ccdit" else ""
        raise ConfigError(
            f"stage.init_from={source} is a {meta.get('stage')} {meta.get('family')} checkpoint but this stage trains a {family}.{hint}"
        )
    theirs = meta["model_config"].get("caption_channels")
    if mine is not None and theirs is not None and mine != theirs:
        raise ConfigError(
            f"stage.init_from={source} was built for text embeddings of width {theirs}, but the shards' text encoder "
            f"gives width {mine}. Reparameterize with --data SHARDS (or --caption-channels {mine}), or use shards from the matching encoder."
        )
    changed = model_config_changes(meta, model_config)
    control = model_config.get("control_blocks") or 0
    new_parts = []  # what this model adds to the source's: started here, not loaded
    for key, prefix in (("control_blocks", "controlnet."), ("guidance_embed", "guidance_embedder.")):
        if model_config.get(key) and not meta["model_config"].get(key):
            changed.pop(key, None)  # a base for a new ControlNet, a teacher for a new student
            new_parts.append(prefix)
    if changed:
        grid = changed.get("pos_grid")
        raise ConfigError(
            f"stage.init_from={source} holds a different model (checkpoint, this run): {changed}. "
            + (f"Rebuild it with reparameterize.py ... --pos-grid {grid[1]}, or set model.pos_grid={grid[0]}."
               if grid and len(changed) == 1 else
               "Reparameterize it for this stage first (reparameterize.py) or fix the model config.")
        )
    weights = load_weights(source, ema=meta.get("has_ema", False))
    for target in (model, ema) if ema is not None else (model,):
        if new_parts:
            load_into_extended(target, weights, new_parts)
        else:
            load_portable(target, weights)
    started = {"controlnet.": f"ControlNet copies of its first {control} blocks, projections at zero",
               "guidance_embedder.": "a guidance-scale embedding at zero (the student starts as the teacher)"}
    log.info("initialized from %s (%s, step %d)%s", source, meta["stage"], meta["step"], "".join(f"; {started[p]}" for p in new_parts))


def load_into_extended(model: nn.Module, weights: dict, new_parts: list[str]) -> None:
    """A model's weights into the same model with new parts (``new_parts``: parameter name prefixes: a fresh
    ControlNet, a guidance embedding): everything else must fit; a ControlNet's copies then take the
    weights of the blocks they shadow, and the new parts' closed outputs stay closed."""
    from models.linear import portable_state_dict

    missing, unexpected = model.load_state_dict(portable_state_dict(weights), strict=False)
    missing = [k for k in missing if not k.startswith(tuple(new_parts)) and not k.endswith("_extra_state")]
    if missing or unexpected:
        raise ConfigError(f"the source's weights do not fit this model: missing {missing[:8]}, unexpected {unexpected[:8]}")
    if "controlnet." in new_parts:
        model.controlnet.copy_from(model.blocks)
        model.controlnet.zero_projections()


def resume_adapters(resume_from: Path, meta: dict, model: nn.Module, ema: nn.Module, adapter_base: dict | None) -> None:
    from models.adapters import AdapterError, load_adapter_state

    saved = (meta.get("adapter") or {}).get("base")
    if adapter_base is None or saved is None:
        raise ConfigError(f"cannot resume {resume_from}: it was saved by a {'LoRA' if saved else 'full'} run and this run "
                          f"{'trains LoRA adapters' if adapter_base else 'trains every weight'} (train.lora.rank). Resume "
                          "with the same train.lora, or start a new run_dir")
    if saved["sha256"] != adapter_base["sha256"]:
        raise ConfigError(f"cannot resume {resume_from}: its adapters were trained on {saved['path']} (sha256 "
                          f"{saved['sha256'][:16]}...), and stage.init_from is {adapter_base['path']} (sha256 "
                          f"{adapter_base['sha256'][:16]}...)")
    try:
        load_adapter_state(model, load_weights(resume_from))
        load_adapter_state(ema, load_weights(resume_from, ema=True))
    except AdapterError as e:
        raise ConfigError(f"cannot resume {resume_from}: {e} (train.lora changed?)") from e


def resume_or_init(cfg: DictConfig, model: nn.Module, ema: nn.Module, optimizer, ckpt_root: Path, model_config: dict,
                   use_fsdp: bool, adapter_base: dict | None = None) -> ResumePoint:
    """Load the run's latest checkpoint into model, EMA and (unless FSDP shards it later) the
    optimizer; or, for a new run, the stage.init_from weights. ``adapter_base``: an adapter run, whose
    base is loaded already and whose checkpoints hold the adapters, trained on that base."""
    resume_from = find_resume(cfg, ckpt_root)
    if resume_from is None:
        if cfg.stage.init_from and adapter_base is None:
            init_weights(model, ema, cfg.stage.init_from, model_config, cfg.model.family)
        return ResumePoint()
    meta = read_meta(resume_from)
    if meta["stage"] != cfg.stage.name:
        raise ConfigError(
            f"cannot resume {resume_from}: it is a {meta['stage']} checkpoint and this is {cfg.stage.name}. "
            "To start a stage from the previous one, reparameterize it and use stage.init_from."
        )
    changed = model_config_changes(meta, model_config)
    if changed:
        raise ConfigError(
            f"cannot resume {resume_from}: the model config changed (checkpoint, now): {changed}. "
            "Architecture keys must match to resume; start a new run_dir instead."
        )
    if adapter_base is not None or meta.get("adapter"):
        resume_adapters(resume_from, meta, model, ema, adapter_base)
    else:
        load_portable(model, load_weights(resume_from))
        load_portable(ema, load_weights(resume_from, ema=True))
    state = load_train_state(resume_from)
    saved_format = state.get("optimizer_format", "torch")
    if saved_format != ("fsdp_full" if use_fsdp else "torch"):
        raise ConfigError(
            f"cannot resume {resume_from}: its optimizer state was saved by a "
            f"{'multi-process FSDP' if saved_format == 'fsdp_full' else 'DDP or single-process'} run, and this run is "
            f"{'multi-process FSDP' if use_fsdp else 'DDP or single-process'}. Resume with the same train.parallel and "
            "number of processes, or start a new run_dir from its weights with stage.init_from."
        )
    if not use_fsdp:
        optimizer.load_state_dict(state["optimizer"])
    log.info("resumed from %s at step %d", resume_from, int(state["step"]))
    return ResumePoint(resume_from, state["optimizer"], int(state["step"]), int(state["batches_done"]), state.get("positions"),
                       state.get("repa"))
