"""Everything a run decides before its first step, checked early and resolved into a :class:`RunSpec`.

The Hydra config stays what the user composed: values a stage inherits from its init checkpoint
(timestep shift, position-embedding base grid and layout) and the data it really reads (a subset
written beside the full data) are resolved here into the spec, and the config recorded with the
run shows them (``RunSpec.recorded_config``). Impossible settings stop with a ConfigError that
says what to change, before any data is built or any weight allocated.
"""
from __future__ import annotations

import copy
import os
import shutil
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from omegaconf import DictConfig, OmegaConf

from data.shards import check_manifest, is_bucketed
from data.stage import stage_shards
from inference.conditioning import ClassConditioning, Conditioning, ConditioningError, TextConditioning, kind_of
from models.autoencoder import load_autoencoder
from models.checkpoint import CheckpointError, read_meta
from models.presets import MODEL_CLASSES, check_shape, model_config, preset_fields
from training.config import ConfigError
from training.checkpoint import remove_partial_saves
from training.distributed import DistInfo, barrier
from training.lock import RunLock
from training.logger import log
from training.precision import check_micro_batch


@dataclass
class RunSpec:
    """What a run resolved from its config, its data and its init checkpoint.

    micro_batch: per rank and accumulation step. data_path / manifest: the shards it reads.
    autoencoder: the stage's autoencoder (sampling decodes with it). conditioning: from the
    shards (inference/conditioning.py). model_config: the architecture (a config dataclass).
    shift: the timestep shift (the init checkpoint's when the config leaves it null).
    """

    run_dir: Path
    micro_batch: int
    data_path: Path
    manifest: dict
    autoencoder: nn.Module
    conditioning: Conditioning
    model_config: Any
    shift: float

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        c = self.model_config
        return (c.in_channels, c.input_size, c.input_size)

    def recorded_config(self, cfg: DictConfig) -> str:
        """config.yaml of the run: the composed config with the resolved values in their places."""
        out = copy.deepcopy(cfg)
        out.run_dir = str(self.run_dir)
        out.data.path = str(self.data_path)
        out.train.timestep.shift = float(self.shift)
        for key in ("base_size", "pos_grid"):
            if key in out.model:
                out.model[key] = getattr(self.model_config, key)
        return OmegaConf.to_yaml(out, resolve=True)


def resolve(cfg: DictConfig, dist_info: DistInfo, run_dir: Path) -> RunSpec:
    """Check the config, build or find the data, and resolve the run spec. Order matters for the
    random stream: the model is built after this, from the seed set here."""
    micro = check_batch(cfg, dist_info.world_size)
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    kind = check_family(cfg)
    init_meta = init_checkpoint_meta(cfg.stage.get("init_from"))
    shift = cfg.train.timestep.shift
    if shift is None:  # the init checkpoint's (reparameterize.py applies SD3's rule at 2->3)
        shift = float((init_meta.get("sampling") or {}).get("shift", 1.0))
    autoencoder = load_autoencoder(cfg.data.autoencoder, cfg.data.autoencoder_subfolder).to(dist_info.device)
    size = cfg.data.image_size
    if size % autoencoder.downsample:
        raise ConfigError(f"data.image_size={size} is not divisible by the autoencoder's downsampling ({autoencoder.downsample})")
    latent_shape = (autoencoder.latent_channels, size // autoencoder.downsample, size // autoencoder.downsample)
    check_shape(cfg.model.family, cfg.model.preset, latent_shape[1])  # impossible shapes fail before any data is touched
    path, manifest = read_data(cfg, dist_info, autoencoder, latent_shape)
    conditioning = make_conditioning(cfg, kind, path, manifest)
    mcfg = build_model_config(cfg, autoencoder, conditioning, init_meta)
    return RunSpec(run_dir, micro, path, manifest, autoencoder, conditioning, mcfg, float(shift))


# ---------------------------------------------------------------- checks
def check_batch(cfg: DictConfig, world_size: int) -> int:
    """Per-rank micro-batch from the global batch; refuses uneven splits."""
    gbs, accum = cfg.train.global_batch_size, cfg.train.grad_accum
    if gbs % (world_size * accum):
        raise ConfigError(
            f"train.global_batch_size={gbs} is not divisible by world_size ({world_size}) x train.grad_accum ({accum}). "
            f"Pick a global batch that is a multiple of {world_size * accum}."
        )
    micro = gbs // (world_size * accum)
    check_micro_batch(cfg.precision, micro, gbs, world_size, accum)
    return micro


def check_family(cfg: DictConfig) -> type[Conditioning]:
    """The stage's conditioning kind, which must be one the model family takes."""
    try:
        kind = kind_of(cfg.stage.conditioning)
    except ConditioningError as e:
        raise ConfigError(f"stage.{e}") from e
    if cfg.model.family != kind.family:
        raise ConfigError(
            f"stage {cfg.stage.name} conditions on {kind.kind} but model.family={cfg.model.family}; "
            f"{kind.kind} conditioning needs model={kind.family}"
        )
    return kind


def run_directory(cfg: DictConfig) -> Path:
    """``run_dir``, or under a Hydra sweep (``-m``) this job's own ``run_dir/job<N>``, so the jobs of a
    sweep never resume each other's checkpoints."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hydra_cfg = HydraConfig.get()
    except (ImportError, ValueError):  # composed outside a Hydra app (tests, scripts)
        return Path(cfg.run_dir)
    if hydra_cfg.mode == RunMode.MULTIRUN:
        job = Path(cfg.run_dir) / f"job{hydra_cfg.job.num}"
        log.info("sweep job %d -> %s: %s", hydra_cfg.job.num, job, " ".join(hydra_cfg.overrides.task))
        return job
    return Path(cfg.run_dir)


def prepare_run_dir(run_dir: Path) -> RunLock:
    """The run directory, made and locked for this trainer, with what an interrupted save left removed
    (so a full disk is measured without it), and checked writable before any work is done."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"run_dir={str(run_dir)!r} cannot be created ({e.strerror}); set run_dir to a folder you can write to") from e
    lock = RunLock(run_dir).acquire()  # before anything in it is touched: it may be another trainer's
    try:
        for stale in remove_partial_saves(run_dir / "checkpoints"):
            log.info("removed %s, left by a save that was interrupted", stale)
        probe = run_dir / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        lock.release()
        raise ConfigError(f"run_dir={str(run_dir)!r} is not writable ({e.strerror}); set run_dir to a folder you can write to") from e
    return lock


def check_free_space(run_dir: Path, model: nn.Module) -> None:
    """Room for two checkpoints (weights, EMA, Adam moments: 16 bytes a parameter each) plus 10%."""
    need = int(2 * 16 * sum(p.numel() for p in model.parameters()) * 1.1)
    free = shutil.disk_usage(run_dir).free
    if free < need:
        raise ConfigError(
            f"{run_dir} has {free / 2**30:.2f} GiB free but a checkpoint of this model needs about {need / 2**31:.2f} GiB "
            f"and {need / 2**30:.2f} GiB must be free (an old one stays until a new one is complete); "
            "free space or set run_dir elsewhere"
        )


def init_checkpoint_meta(source: str | None) -> dict:
    """The meta of ``stage.init_from`` (empty without one); a missing one says how to make it."""
    if not source:
        return {}
    if not Path(source).exists():
        raise ConfigError(
            f"stage.init_from={source} does not exist. Make it from the previous stage's run with "
            f"`python reparameterize.py runs/<previous stage> {source} ...` (see reparameterize.py --help; "
            "the demo: scripts/run_demo.py does it), or set stage.init_from=null to start from scratch."
        )
    try:
        return read_meta(source)
    except CheckpointError as e:
        raise ConfigError(f"stage.init_from={source}: {e}") from e


# ---------------------------------------------------------------- data and conditioning
def read_data(cfg: DictConfig, dist_info: DistInfo, autoencoder: nn.Module, latent_shape: tuple[int, int, int]) -> tuple[Path, dict]:
    """The stage's shards (built or subset on first use), their manifest checked against this config."""
    path, manifest = stage_shards(cfg.data, cfg.seed, dist_info.is_main, lambda: barrier(dist_info), log.info)
    expected = {
        "autoencoder": cfg.data.autoencoder,
        "latent_shape": list(latent_shape),
        "scaling_factor": autoencoder.scaling_factor,
        "shift_factor": autoencoder.shift_factor,
    }
    if is_bucketed(manifest):  # shapes vary
        del expected["latent_shape"]
    if cfg.stage.conditioning == "class":
        expected["num_classes"] = cfg.data.num_classes
    check_manifest(manifest, expected, where=str(path))
    return path, manifest


def eval_prompts(cfg: DictConfig, manifest: dict) -> list[str]:
    """data.eval_prompts: a list, or 'held_out' for the captions the data builder held out."""
    spec = cfg.data.get("eval_prompts")
    if spec == "held_out":
        prompts = list(manifest.get("held_out_captions") or [])
        if not prompts:
            raise ConfigError(f"data.eval_prompts=held_out but {cfg.data.path} holds nothing out (build it with --holdout)")
        return prompts
    return list(spec or [])


def make_conditioning(cfg: DictConfig, kind: type[Conditioning], path: Path, manifest: dict) -> Conditioning:
    try:
        if kind is ClassConditioning:
            return ClassConditioning(int(cfg.data.num_classes), manifest.get("class_names"))
        mix = cfg.data.get("caption_mix")
        cond = TextConditioning.for_training(str(path), manifest, cfg.data.get("text_mode", "precomputed"), dict(mix) if mix else None)
        cond.examples = eval_prompts(cfg, manifest)  # what the evaluation prompts, and the sampler offers as examples
        return cond
    except ConditioningError as e:
        raise ConfigError(str(e)) from e


# ---------------------------------------------------------------- the model's config
def build_model_config(cfg: DictConfig, autoencoder: nn.Module, conditioning: Conditioning, init_meta: dict | None = None):
    """The model's config from the preset, the data, the conditioning (classes or text width) and,
    where the config leaves them null, the init checkpoint's position-embedding grid."""
    init_config = (init_meta or {}).get("model_config") or {}
    fields_ = dict(input_size=cfg.data.image_size // autoencoder.downsample, in_channels=autoencoder.latent_channels,
                   **conditioning_fields(conditioning))
    _, config_cls = MODEL_CLASSES[cfg.model.family]
    preset = {f.name: f.default for f in fields(config_cls)} | preset_fields(cfg.model.family, cfg.model.preset)
    for key in ("qk_norm",):  # architecture the preset fixes: an explicit setting wins, and says so
        value = cfg.model.get(key)
        if value is not None:
            if value != preset[key]:
                log.info("model.%s=%s overrides the %s preset's %s", key, value, cfg.model.preset, preset[key])
            fields_[key] = value
    if "pixels_per_latent" in {f.name for f in fields(config_cls)}:  # micro-conditions are in pixels
        fields_["pixels_per_latent"] = autoencoder.downsample
    for key in ("block", "micro_conditions", "base_size", "pos_grid"):
        value = cfg.model.get(key)
        if value is None and key in ("base_size", "pos_grid"):
            value = init_config.get(key)  # absent in older checkpoints: the default
        if value is not None:
            fields_[key] = value
    config = model_config(cfg.model.family, cfg.model.preset, **fields_)
    if cfg.model.get("check_diffusers_export"):
        from models.diffusers_pixart import IncompatibleModel, check_exportable

        try:
            check_exportable(config)
        except IncompatibleModel as e:
            raise ConfigError(f"model.check_diffusers_export: {e}") from e
    return config


def conditioning_fields(conditioning: Conditioning) -> dict:
    """The architecture fields a conditioning fixes: the classes of a ccDiT, the text width of an mmDiT."""
    if isinstance(conditioning, ClassConditioning):
        return {"num_classes": conditioning.num_classes}
    return {"caption_channels": conditioning.width}
