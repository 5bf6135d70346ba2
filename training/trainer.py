"""The trainer shared by every stage: setup -> data -> model -> loop -> checkpoint.

A stage differs from another only in its config (configs/stage/*.yaml). The
loop is rectified flow (flow/rectified_flow.py): draw t, interpolate, predict
the velocity, MSE; with condition dropout for classifier-free guidance, EMA,
gradient accumulation and clipping, DDP across ranks, periodic sample grids
scored by the evaluator, and atomic checkpoints from which a run continues
exactly (same step, optimizer, EMA, data position and random stream).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from omegaconf import DictConfig, OmegaConf
from torch.nn.parallel import DistributedDataParallel as DDP

from data.shards import ShardStream, check_manifest, read_manifest
from flow.rectified_flow import flow_loss, interpolate, loss_by_bin, sample_timesteps
from inference.images import make_grid, save_png, to_uint8
from inference.pipeline import SampleSettings, call_model, generate
from models.autoencoder import load_autoencoder
from models.linear import fp8_context, load_portable
from models.presets import build_model, count_parameters, model_config
from training import checkpoint as ckpt
from training import fsdp, fused_wgrad
from training.conditioning import ConditioningError, make_conditioning
from training.distributed import DistInfo, all_reduce_mean, barrier, cleanup, replica_divergence, setup, shared_items
from training.ema import ema_decay_at, make_ema, update_ema
from training.guards import PREEMPTED_EXIT_CODE, NonFiniteGuard, SpikeDetector, StopRequest
from training.logger import RunLogger, log, setup_console
from training.optim import lr_at, make_optimizer


class ConfigError(ValueError):
    """The config asks for something impossible; the message says what to change."""


# ---------------------------------------------------------------- setup helpers
def check_batch(cfg: DictConfig, world_size: int) -> int:
    """Per-rank micro-batch from the global batch; refuses uneven splits."""
    gbs, accum = cfg.train.global_batch_size, cfg.train.grad_accum
    if gbs % (world_size * accum):
        raise ConfigError(
            f"train.global_batch_size={gbs} is not divisible by world_size ({world_size}) x train.grad_accum ({accum}). "
            f"Pick a global batch that is a multiple of {world_size * accum}."
        )
    micro = gbs // (world_size * accum)
    if cfg.precision.linear == "te" and micro % 8:
        # TE's FP8 GEMMs want the rows of every input (tokens x samples; for the per-sample adaLN linears,
        # samples alone) divisible by 8
        raise ConfigError(
            f"precision.linear=te runs its GEMMs in FP8, which needs the per-rank micro-batch to be a multiple of 8, but it is "
            f"{micro} (train.global_batch_size={gbs} / {world_size} ranks / train.grad_accum={accum}). "
            f"Use a global batch that is a multiple of {8 * world_size * accum}."
        )
    return micro


def step_generator(seed: int, rank: int, step: int, device: torch.device) -> torch.Generator:
    """The random stream of one training step on one rank: a pure function of (seed, rank, step),
    so a resumed run draws exactly the noise, timesteps and dropout an uninterrupted one would."""
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + rank) * 10_000_019 + step)
    return g


def prepare_data(cfg: DictConfig, dist_info: DistInfo) -> dict:
    """Build the demo shards if asked and missing, then read and return the manifest."""
    path = Path(cfg.data.path)
    min_score = cfg.data.get("min_score")
    if min_score is not None:  # stage 5: the high-quality subset, written once beside the full data
        from data.shards import write_subset

        source, path = path, Path(f"{path}-{cfg.data.score_key}{min_score:g}")
        if dist_info.is_main and not (path / "manifest.json").exists():
            if cfg.data.generate and not (source / "manifest.json").exists():
                _build_demo(cfg, source)
            n = write_subset(source, path, lambda meta: _score(meta, cfg.data.score_key) >= min_score)
            log.info("wrote the subset with %s >= %g: %d samples in %s", cfg.data.score_key, min_score, n, path)
        barrier(dist_info)
        cfg.data.path = str(path)
        return read_manifest(path)
    if cfg.data.generate and not (path / "manifest.json").exists():
        if cfg.data.name != "shapes":
            raise ConfigError(f"data.generate=true only builds the shapes demo data, not {cfg.data.name!r}")
        if dist_info.is_main:
            _build_demo(cfg, path)
        barrier(dist_info)
    return read_manifest(path)


def _build_demo(cfg: DictConfig, path: Path) -> None:
    from data.shapes import build_shards

    canvases = None
    spec = cfg.data.get("buckets")
    if spec:  # aspect-ratio buckets from a pixel count and a step (stage 4)
        from data.buckets import make_buckets

        canvases = make_buckets(int(spec.target_pixels), int(spec.step), float(spec.get("max_ratio", 4.0)))
    log.info("building %d shapes samples into %s (first use only)", cfg.data.num_samples, path)
    build_shards(path, cfg.data.num_samples, cfg.data.image_size, seed=cfg.seed, text_encoder=cfg.data.get("text_encoder"),
                 max_length=cfg.data.get("max_length", 16), holdout=bool(cfg.data.get("holdout", False)), canvases=canvases)


def _score(meta: dict, key: str) -> float:
    value = (meta.get("scores") or {}).get(key)
    return float("-inf") if value is None else float(value)


def build_model_config(cfg: DictConfig, autoencoder: nn.Module, caption_channels: int | None = None):
    """The model's config from the preset and the data; ``caption_channels`` (text width) for mmDiT."""
    size = cfg.data.image_size
    if size % autoencoder.downsample:
        raise ConfigError(f"data.image_size={size} is not divisible by the autoencoder's downsampling ({autoencoder.downsample})")
    fields = dict(input_size=size // autoencoder.downsample, in_channels=autoencoder.latent_channels,
                  qk_norm=cfg.model.qk_norm, linear_backend=cfg.precision.linear)
    if cfg.model.family == "ccdit":
        fields["num_classes"] = cfg.data.num_classes
    else:
        fields["pixels_per_latent"] = autoencoder.downsample
        if caption_channels is not None:
            fields["caption_channels"] = caption_channels
    for key in ("block", "micro_conditions", "base_size", "pos_grid"):
        if cfg.model.get(key) is not None:
            fields[key] = cfg.model[key]
    return model_config(cfg.model.family, cfg.model.preset, **fields)


def inherit_from_init(cfg: DictConfig) -> None:
    """Settings a stage takes from the checkpoint it starts from when its config leaves them null:
    the timestep shift (reparameterize.py applies SD3's rule at 2->3) and the position-embedding
    base grid (stage 3 keeps stage 2's range). Written back into cfg, so config.yaml records them."""
    source = cfg.stage.get("init_from")
    if source and not Path(source).exists():
        raise ConfigError(
            f"stage.init_from={source} does not exist. Make it from the previous stage's run with "
            f"`python reparameterize.py runs/<previous stage> {source} ...` (see reparameterize.py --help; "
            "the demo: scripts/run_demo.py does it), or set stage.init_from=null to start from scratch."
        )
    init_meta = ckpt.read_meta(source) if source else {}
    if cfg.train.timestep.shift is None:
        cfg.train.timestep.shift = float((init_meta.get("sampling") or {}).get("shift", 1.0))
    if "base_size" in cfg.model and cfg.model.base_size is None and init_meta:
        cfg.model.base_size = init_meta["model_config"].get("base_size")
    if "pos_grid" in cfg.model and cfg.model.pos_grid is None and init_meta:  # 3to4 chose it
        cfg.model.pos_grid = init_meta["model_config"].get("pos_grid")  # absent in older checkpoints: the default


def check_family(cfg: DictConfig) -> None:
    wants = {"class": "ccdit", "text": "mmdit"}.get(cfg.stage.conditioning)
    if wants and cfg.model.family != wants:
        raise ConfigError(
            f"stage {cfg.stage.name} conditions on {cfg.stage.conditioning} but model.family={cfg.model.family}; "
            f"{cfg.stage.conditioning} conditioning needs model={wants}"
        )


def check_run_dir(run_dir: Path) -> None:
    """The run directory must be writable before any work is done."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"run_dir={str(run_dir)!r} is not writable ({e.strerror}); set run_dir to a folder you can write to") from e


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


def log_config_changes(run_dir: Path, config_yaml: str) -> None:
    """Resuming with changed settings is allowed (model changes are refused elsewhere); say what changed."""
    old_path = run_dir / "config.yaml"
    if not old_path.is_file():
        return
    flat = lambda c: {k: v for k, v in _flatten(OmegaConf.to_container(OmegaConf.create(c)))}  # noqa: E731
    old, new = flat(old_path.read_text()), flat(config_yaml)
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            log.info("config change since the last run: %s: %r -> %r", key, old.get(key), new.get(key))


def _flatten(d, prefix=""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _flatten(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def model_config_changes(meta: dict, model_config: dict) -> dict:
    """{key: (checkpoint, now)} for every architecture setting that differs. Keys a checkpoint
    predates count as their default; pixels_per_latent only matters with micro-conditions."""
    from models.presets import MODEL_CLASSES

    _, config_cls = MODEL_CLASSES[meta["family"]]
    old = asdict(config_cls(**meta["model_config"]))
    # linear_backend is precision, not architecture: every backend holds the same weights
    changed = {k: (old.get(k), v) for k, v in model_config.items() if old.get(k) != v and k != "linear_backend"}
    if not model_config.get("micro_conditions") and not old.get("micro_conditions"):
        changed.pop("pixels_per_latent", None)
    return changed


def init_weights(model: nn.Module, ema: nn.Module, source: str, model_config: dict, family: str) -> None:
    """Start a fresh run from another checkpoint's weights (its EMA if it has one): the
    previous stage after reparameterize.py, or a run of the same stage to fine-tune."""
    meta = ckpt.read_meta(source)
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
            f"gives width {mine}. Reparameterize with --caption-channels {mine}, or use shards from the matching encoder."
        )
    changed = model_config_changes(meta, model_config)
    if changed:
        grid = changed.get("pos_grid")
        raise ConfigError(
            f"stage.init_from={source} holds a different model (checkpoint, this run): {changed}. "
            + (f"Rebuild it with reparameterize.py ... --pos-grid {grid[1]}, or set model.pos_grid={grid[0]}."
               if grid and len(changed) == 1 else
               "Reparameterize it for this stage first (reparameterize.py) or fix the model config.")
        )
    weights = ckpt.load_weights(source, ema=meta.get("has_ema", False))
    load_portable(model, weights)
    load_portable(ema, weights)
    log.info("initialized from %s (%s, step %d)", source, meta["stage"], meta["step"])


def find_resume(cfg: DictConfig, ckpt_root: Path) -> Path | None:
    if cfg.resume == "auto":
        return ckpt.latest_checkpoint(ckpt_root)
    if cfg.resume in (None, "none"):
        if ckpt.list_checkpoints(ckpt_root):
            raise ConfigError(
                f"{ckpt_root} already has checkpoints and resume=none: use resume=auto to continue that run, "
                "or a new run_dir to start another"
            )
        return None
    path = Path(cfg.resume)
    if not path.is_dir():
        raise ConfigError(f"resume={cfg.resume!r}: no such checkpoint directory")
    return path


# ---------------------------------------------------------------- evaluation
def eval_conditions(conditioning, cfg: DictConfig, manifest: dict, n: int, device):
    """(cond, uncond, wanted attributes per sample or None, grid columns, column titles) for evaluation."""
    if conditioning.type == "class":
        k = conditioning.num_classes
        labels = torch.arange(n, device=device) % k
        wanted = None
        if cfg.data.name == "shapes":
            from data.evaluator import class_attributes

            wanted = class_attributes(labels)
        return labels, conditioning.null(n, device), wanted, k, conditioning.class_names
    prompts = eval_prompts(cfg, manifest)
    if not prompts:
        return None
    chosen = [prompts[i % len(prompts)] for i in range(n)]
    wanted = None
    if cfg.data.name == "shapes":
        from data.shapes import parse_caption

        wanted = [parse_caption(p) for p in chosen]
    return conditioning.encode(chosen, device), conditioning.null(n, device), wanted, len(prompts), prompts


def eval_prompts(cfg: DictConfig, manifest: dict) -> list[str]:
    """data.eval_prompts: a list, or 'held_out' for the captions the data builder held out."""
    spec = cfg.data.get("eval_prompts")
    if spec == "held_out":
        prompts = list(manifest.get("held_out_captions") or [])
        if not prompts:
            raise ConfigError(f"data.eval_prompts=held_out but {cfg.data.path} holds nothing out (build it with --holdout)")
        return prompts
    return list(spec or [])


def evaluate(model, autoencoder, cfg, latent_shape, conditioning, manifest, device, out_png: Path | None) -> dict:
    """Sample grid (PNG) and, on the shapes data, the evaluator's accuracy: per attribute, and
    'class_accuracy' (stage 1: shape and colour) or 'caption_accuracy' (text: every captioned attribute).
    With data.eval_aspects ([[h, w], ...] in pixels) it samples at each size: one grid and one score
    per size (suffix _HxW), and the headline scores are their mean."""
    aspects = [tuple(hw) for hw in (cfg.data.get("eval_aspects") or [])]
    if not aspects:
        return _evaluate_at(model, autoencoder, cfg, latent_shape, conditioning, manifest, device, out_png)
    down = autoencoder.downsample
    result: dict[str, Any] = {}
    per: list[dict] = []
    for h, w in aspects:
        png = None if out_png is None else out_png.with_name(f"{out_png.stem}_{h}x{w}.png")
        r = _evaluate_at(model, autoencoder, cfg, (latent_shape[0], h // down, w // down), conditioning, manifest, device, png)
        per.append(r)
        result.update({f"{k}_{h}x{w}": v for k, v in r.items()})
    for k in per[0]:
        if isinstance(per[0][k], float):
            result[k] = sum(r[k] for r in per) / len(per)
    return result


def _evaluate_at(model, autoencoder, cfg, latent_shape, conditioning, manifest, device, out_png: Path | None) -> dict:
    columns = conditioning.num_classes if conditioning.type == "class" else max(len(eval_prompts(cfg, manifest)), 1)
    n = max(cfg.data.eval_samples, 2 * columns) if cfg.data.name == "shapes" else 4 * min(columns, 8)
    conds = eval_conditions(conditioning, cfg, manifest, n, device)
    if conds is None:
        log.info("no evaluation prompts (data.eval_prompts is empty): skipping the evaluation")
        return {}
    cond, uncond, wanted, columns, _ = conds
    s = cfg.train.sample
    settings = SampleSettings(s.steps, s.cfg_scale, s.solver, cfg.train.timestep.shift, s.seed)
    images = generate(model, autoencoder, cond, uncond, latent_shape, settings, device)
    result: dict[str, Any] = {}
    if wanted is not None:
        from data.evaluator import attribute_accuracy

        acc = attribute_accuracy(images, wanted)
        main = "class_accuracy" if conditioning.type == "class" else "caption_accuracy"
        result[main] = acc.pop("all")
        result.update({f"{k}_accuracy": v for k, v in acc.items()})
    if out_png is not None:
        k = min(columns, 16)  # one column per class or prompt, four rows of seeds
        idx = [i for r in range(4) for i in range(r * columns, r * columns + k) if i < n]
        save_png(make_grid(to_uint8(images[idx]), ncols=k, upscale=max(1, 96 // max(images.shape[-2:]))), out_png)
        result["grid"] = str(out_png)
    return result


# ---------------------------------------------------------------- the run
def load_data(cfg: DictConfig, dist_info: DistInfo, autoencoder: nn.Module, latent_shape: tuple[int, int, int]):
    """Prepare (or find) the stage's shards, check their manifest against this config, and make
    the stage's conditioning from them. Returns (manifest, conditioning)."""
    manifest = prepare_data(cfg, dist_info)
    expected = {
        "autoencoder": cfg.data.autoencoder,
        "latent_shape": list(latent_shape),
        "scaling_factor": autoencoder.scaling_factor,
        "shift_factor": autoencoder.shift_factor,
    }
    if manifest.get("latent_shape") is None and manifest.get("buckets"):  # aspect-ratio buckets: shapes vary
        del expected["latent_shape"]
    if cfg.stage.conditioning == "class":
        expected["num_classes"] = cfg.data.num_classes
    check_manifest(manifest, expected, where=cfg.data.path)
    try:
        conditioning = make_conditioning(cfg.stage.conditioning, cfg.data.path, manifest, cfg.data)
    except ConditioningError as e:
        raise ConfigError(str(e)) from e
    return manifest, conditioning


@dataclass
class Start:
    """Where a run starts: the checkpoint it resumes (None: a new run), the optimizer state to
    load, the step and the number of batches already read."""

    resumed_from: Path | None = None
    optimizer_state: dict | None = None
    step: int = 0
    batches_done: int = 0


def resume_or_init(cfg: DictConfig, model: nn.Module, ema: nn.Module, optimizer, ckpt_root: Path, model_config: dict,
                   use_fsdp: bool, is_main: bool) -> Start:
    """Load the run's latest checkpoint into model, EMA and (unless FSDP shards it later) the
    optimizer; or, for a new run, the stage.init_from weights. Refuses a checkpoint of another
    stage, architecture or parallel layout with what to do instead."""
    if is_main:
        for stale in ckpt.remove_partial_saves(ckpt_root):
            log.info("removed %s, left by a save that was interrupted", stale)
    resume_from = find_resume(cfg, ckpt_root)
    if resume_from is None:
        if cfg.stage.init_from:
            init_weights(model, ema, cfg.stage.init_from, model_config, cfg.model.family)
        return Start()
    meta = ckpt.read_meta(resume_from)
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
    load_portable(model, ckpt.load_weights(resume_from))
    load_portable(ema, ckpt.load_weights(resume_from, ema=True))
    state = ckpt.load_train_state(resume_from)
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
    return Start(resume_from, state["optimizer"], int(state["step"]), int(state["batches_done"]))


def wrap_for_training(cfg: DictConfig, model: nn.Module, ema: nn.Module, optimizer, optimizer_state: dict | None,
                      dist_info: DistInfo, use_fsdp: bool, num_buckets: int):
    """Activation checkpointing, fused wgrad, then FSDP2 sharding or DDP, then torch.compile.

    Returns (the module the loop calls, the optimizer (rebuilt on the shards under FSDP), the
    weights whose gradients the fused-wgrad protocol reduces). ``model`` stays the raw module:
    checkpoints and the EMA read it."""
    model.gradient_checkpointing = bool(cfg.train.activation_checkpointing)
    owned = []
    if cfg.precision.get("fuse_wgrad"):
        if use_fsdp:
            raise ConfigError("precision.fuse_wgrad works with DDP, not with train.parallel=fsdp")
        try:
            owned = fused_wgrad.enable(model)
        except ValueError as e:
            raise ConfigError(str(e)) from e
        if dist_info.enabled:
            fused_wgrad.exclude_from_ddp(model, owned)
    if use_fsdp:  # shard the loaded weights, then build the optimizer on the shards
        fsdp.shard(model, ema, dist_info.device, dist_info.world_size)
        optimizer = make_optimizer(model, cfg.train.lr, cfg.train.weight_decay, cfg.train.betas)
        if optimizer_state is not None:
            fsdp.load_optimizer_state(model, optimizer, optimizer_state)
        wrapped = model
    else:
        wrapped = DDP(model) if dist_info.enabled else model
    if cfg.train.compile:
        if num_buckets:  # one static graph per bucket: torch 2.13's dynamic-shape graph broke in backward on a bucket change
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, num_buckets + 2)
        wrapped = torch.compile(wrapped, dynamic=False if num_buckets else None, mode=cfg.train.compile_mode)
    return wrapped, optimizer, owned


def checkpoint_meta(cfg: DictConfig, model_config: dict, conditioning, scale: float, shift: float) -> dict:
    """What every checkpoint of this run records beside its weights (training/checkpoint.py)."""
    return {
        "stage": cfg.stage.name,
        "stage_index": int(cfg.stage.index),
        "family": cfg.model.family,
        "preset": cfg.model.preset,
        "model_config": model_config,
        "code_revision": ckpt.code_revision(),
        "autoencoder": {"name": cfg.data.autoencoder, "subfolder": cfg.data.autoencoder_subfolder,
                        "scaling_factor": scale, "shift_factor": shift},
        "conditioning": conditioning.meta(),
        "sampling": {"shift": float(cfg.train.timestep.shift), **OmegaConf.to_container(cfg.train.sample)},
        "data": {"path": cfg.data.path, "name": cfg.data.name},
    }


class LossStats:
    """Loss sums between two log lines: the mean over finite micro-batches (a non-finite one is
    left out, and counted by the guard) and the mean by timestep bin, reduced across ranks."""

    def __init__(self, device: torch.device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.loss_sum, self.loss_n = torch.zeros((), device=self.device), torch.zeros((), device=self.device)
        self.bin_sums, self.bin_counts = torch.zeros(10, device=self.device), torch.zeros(10, device=self.device)

    def add(self, micro_loss: torch.Tensor, per_sample: torch.Tensor, t: torch.Tensor) -> None:
        """``micro_loss``: this micro-batch's mean loss; ``per_sample`` (N,) at timesteps ``t`` (N,)."""
        finite = torch.isfinite(micro_loss)
        self.loss_sum += torch.where(finite, micro_loss, 0.0)
        self.loss_n += finite
        s, c = loss_by_bin(per_sample, t)
        self.bin_sums += s
        self.bin_counts += c

    def reduce(self, dist_info: DistInfo) -> tuple[float, list[float]]:
        """(mean loss (NaN if every micro-batch was non-finite), mean loss per timestep bin); then reset."""
        mean_loss = all_reduce_mean(self.loss_sum / self.loss_n, dist_info).item()
        bins = (all_reduce_mean(self.bin_sums, dist_info) / all_reduce_mean(self.bin_counts, dist_info).clamp(min=1e-9)).tolist()
        self.reset()
        return mean_loss, bins


def autocast_enabled(precision: DictConfig, device: torch.device) -> bool:
    """bf16 autocast for the training forward: on GPU with ``autocast: bf16``; on CPU only when
    ``autocast_cpu`` is also set, since it pays only where the CPU multiplies bf16 natively
    (AVX512-BF16 or AMX: on 2 Zen 4 cores the demo's stage-4 step ran at 1.32-1.47x fp32's speed in
    scripts/bench_cpu_bf16.py; elsewhere bf16 matmuls are emulated and slower than fp32)."""
    if precision.autocast not in ("bf16", "none"):
        raise ConfigError(f"precision.autocast={precision.autocast!r}: expected 'bf16' or 'none'")
    if precision.autocast != "bf16":
        return False
    if device.type != "cpu":
        return True
    if not precision.get("autocast_cpu", False):
        return False
    if not cpu_has_native_bf16():
        log.warning("precision.autocast_cpu: this CPU has no native bf16 (AVX512-BF16 / AMX); bf16 matmuls are emulated and "
                    "likely slower than fp32. Set precision.autocast_cpu=false to train in fp32.")
    return True


def cpu_has_native_bf16() -> bool:
    """x86 AVX512-BF16 or AMX-BF16 (what PyTorch's CPU capability probe reports; False where it can't tell)."""
    caps = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    return bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run (or continue) one stage. Returns a summary: step, loss, checkpoint, evaluation."""
    # ---- setup: processes, run directory, logging
    dist_info = setup()
    try:
        return _train(cfg, dist_info)
    finally:
        cleanup(dist_info)


def _train(cfg: DictConfig, dist_info: DistInfo) -> dict[str, Any]:
    setup_console(dist_info.is_main)
    device = dist_info.device
    micro_batch = check_batch(cfg, dist_info.world_size)
    run_dir = Path(cfg.run_dir)
    ckpt_root = run_dir / "checkpoints"
    if dist_info.is_main:
        check_run_dir(run_dir)
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank

    # ---- model config first: impossible shapes fail before any data is touched
    check_family(cfg)
    inherit_from_init(cfg)
    autoencoder = load_autoencoder(cfg.data.autoencoder, cfg.data.autoencoder_subfolder).to(device)
    mcfg = build_model_config(cfg, autoencoder)
    latent_shape = (mcfg.in_channels, mcfg.input_size, mcfg.input_size)

    # ---- data: shards whose manifest matches this config
    manifest, conditioning = load_data(cfg, dist_info, autoencoder, latent_shape)
    if conditioning.type == "text":
        mcfg = build_model_config(cfg, autoencoder, caption_channels=conditioning.width)

    # ---- model, EMA, optimizer (and resume)
    parallel = cfg.train.get("parallel", "ddp")
    if parallel not in ("ddp", "fsdp"):
        raise ConfigError(f"train.parallel={parallel!r}: expected ddp or fsdp")
    use_fsdp = parallel == "fsdp" and dist_info.enabled
    model = build_model(cfg.model.family, mcfg).to(device)
    ema = make_ema(model)
    optimizer = make_optimizer(model, cfg.train.lr, cfg.train.weight_decay, cfg.train.betas)
    begin = resume_or_init(cfg, model, ema, optimizer, ckpt_root, asdict(mcfg), use_fsdp, dist_info.is_main)
    resume_from, step, batches_done = begin.resumed_from, begin.step, begin.batches_done
    if dist_info.is_main:
        check_free_space(run_dir, model)
    ddp_model, optimizer, owned = wrap_for_training(cfg, model, ema, optimizer, begin.optimizer_state, dist_info, use_fsdp,
                                                    len(manifest.get("buckets") or {}))

    loader = torch.utils.data.DataLoader(
        ShardStream(cfg.data.path, micro_batch, dist_info.rank, dist_info.world_size, cfg.seed, cfg.data.shuffle_buffer, batches_done,
                    max_bad_fraction=float(cfg.data.get("max_bad_fraction", 0.01)),
                    text_names=conditioning.caption_names if conditioning.type == "text" and conditioning.mode == "precomputed" else []),
        batch_size=None,
        num_workers=cfg.data.num_workers,
        pin_memory=device.type == "cuda",
    )
    batches = iter(loader)
    scale, shift = float(manifest["scaling_factor"]), float(manifest["shift_factor"])
    use_autocast = autocast_enabled(cfg.precision, device)
    precision_ctx = lambda: fp8_context(cfg.precision.linear, cfg.precision.te_recipe)  # noqa: E731
    precision_ctx()  # an FP8 recipe this GPU can't run stops here, before training

    log.info(
        "stage %s | %s %s, %.2fM params | data %s (%d samples) | global batch %d = %d ranks x %d x %d accum | device %s",
        cfg.stage.name, cfg.model.family, cfg.model.preset, count_parameters(model) / 1e6, cfg.data.path,
        manifest["num_samples"], cfg.train.global_batch_size, dist_info.world_size, micro_batch, cfg.train.grad_accum, device,
    )
    config_yaml = OmegaConf.to_yaml(cfg, resolve=True)
    if dist_info.is_main:
        log_config_changes(run_dir, config_yaml)
        (run_dir / "config.yaml").write_text(config_yaml)
    meta = checkpoint_meta(cfg, asdict(mcfg), conditioning, scale, shift)
    logger = RunLogger(run_dir, dist_info.is_main, cfg.train.max_steps, step, cfg.train.wandb,
                       OmegaConf.to_container(cfg, resolve=True))

    def check_replicas(at_step: int) -> float | None:
        if use_fsdp:
            return None  # shards, not replicas
        divergence = replica_divergence(model, dist_info)
        if divergence > 1e-6:
            raise RuntimeError(f"DDP replicas diverged at step {at_step} (max parameter difference {divergence:.3g})")
        return divergence

    def save(at_step: int) -> Path | None:
        check_replicas(at_step)
        path = None
        if use_fsdp:  # gather full state dicts onto rank 0 (collective: every rank takes part)
            weights, ema_weights = fsdp.full_state(model), fsdp.full_state(ema)
            optimizer_sd = fsdp.full_optimizer_state(model, optimizer)
        else:
            weights, ema_weights = model, ema
            optimizer_sd = optimizer.state_dict() if dist_info.is_main else None
        if dist_info.is_main:
            state = {"optimizer": optimizer_sd, "optimizer_format": "fsdp_full" if use_fsdp else "torch",
                     "step": at_step, "batches_done": batches_done}
            path = ckpt.save_checkpoint(ckpt_root, at_step, weights, ema_weights, state, config_yaml, meta)
            ckpt.prune_checkpoints(ckpt_root, cfg.train.keep_last, cfg.train.keep_every)
            logger.write(f"saved checkpoint {path}")
        barrier(dist_info)  # nobody races ahead of (or reads) a half-finished save
        return path

    def run_eval(at_step: int) -> dict:
        result = {}
        sampler = ema
        if use_fsdp:  # sample with a plain copy of the gathered EMA on rank 0
            ema_weights = fsdp.full_state(ema)
            if dist_info.is_main:
                sampler = build_model(cfg.model.family, mcfg).to(device).eval()
                load_portable(sampler, ema_weights)
        if dist_info.is_main:
            result = evaluate(sampler, autoencoder, cfg, latent_shape, conditioning, manifest, device,
                              run_dir / "samples" / f"step_{at_step:07d}.png")
            logger.write(f"step {at_step}: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in result.items()))
            logger.log(at_step, {f"eval/{k}": v for k, v in result.items() if isinstance(v, (int, float))})
        barrier(dist_info)
        return result

    # ---- the loop
    tcfg = cfg.train
    stats = LossStats(device)
    t_last, steps_since = time.time(), 0
    start_step, t_start = step, time.time()
    last_ckpt, last_loss, first_batch_overlap, bad_samples = resume_from, None, None, 0
    last_eval: tuple[int, dict] | None = None
    stop = StopRequest().install()
    guard, spikes = NonFiniteGuard(tcfg.max_nonfinite_steps), SpikeDetector(tcfg.spike_factor)
    try:
        stop_after = tcfg.get("stop_after")  # pause here (same schedule); running again continues
        while step < tcfg.max_steps and (stop_after is None or step < stop_after):
            lr = lr_at(step, tcfg.lr, tcfg.warmup_steps, tcfg.max_steps, tcfg.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr
            gen = step_generator(cfg.seed, dist_info.rank, step, device)
            for micro in range(tcfg.grad_accum):
                batch = next(batches)
                batches_done += 1
                bad_samples = max(bad_samples, int(batch.get("bad_samples", 0)))
                if first_batch_overlap is None:
                    first_batch_overlap = shared_items(batch["keys"], dist_info)  # ranks must read different samples
                    if first_batch_overlap:
                        raise RuntimeError(f"DDP ranks read {first_batch_overlap} identical samples in their first batch")
                x0 = (batch["latent"].to(device, non_blocking=True) - shift) * scale  # (N, C, H, W) normalized latents
                cond = conditioning.train_condition(batch, gen, tcfg.cond_dropout, device)  # with CFG dropout to null
                t = sample_timesteps(x0.shape[0], tcfg.timestep.logit_mean, tcfg.timestep.logit_std, tcfg.timestep.shift, gen, device)
                noise = torch.randn(x0.shape, generator=gen, device=device)
                last_micro = micro == tcfg.grad_accum - 1
                if use_fsdp:  # reduce-scatter only on the last micro-batch
                    model.set_requires_gradient_sync(last_micro)
                    sync = contextlib.nullcontext()
                else:
                    sync = contextlib.nullcontext() if (last_micro or not dist_info.enabled) else ddp_model.no_sync()
                with sync, torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_autocast), precision_ctx():
                    pred = call_model(ddp_model, interpolate(x0, noise, t), t, cond)  # (N, C, H, W) velocity
                    per_sample = flow_loss(pred, x0, noise)  # (N,)
                    loss = per_sample.mean() / tcfg.grad_accum
                loss.backward()
                stats.add(loss.detach() * tcfg.grad_accum, per_sample.detach(), t)
            if owned:  # fused wgrad: average main_grad across ranks ourselves, then hand it to the optimizer
                fused_wgrad.reduce_and_publish(owned, dist_info.world_size)
            grad_norm = nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip)  # of the all-reduced gradient
            if use_fsdp:
                grad_norm = fsdp.scalar(grad_norm)
            if guard.check(float(grad_norm), step, last_ckpt):
                optimizer.step()
                update_ema(ema, model, ema_decay_at(step, tcfg.ema_decay, tcfg.get("ema_warmup", True)))
            else:
                logger.write(f"step {step}: non-finite loss or gradient, update skipped ({guard.skipped_total} so far)")
            optimizer.zero_grad(set_to_none=True)
            if owned:
                fused_wgrad.zero(owned)
            step += 1
            steps_since += 1

            if step % tcfg.log_every == 0 or step == tcfg.max_steps:
                mean_loss, bins = stats.reduce(dist_info)
                dt = time.time() - t_last
                it_s = steps_since / max(dt, 1e-9)
                metrics = {"loss": mean_loss, "lr": lr, "grad_norm": float(grad_norm), "it_s": it_s, "skipped_steps": guard.skipped_total,
                           "bad_samples": bad_samples, "img_s": it_s * tcfg.global_batch_size, **{f"loss_bin/{i}": b for i, b in enumerate(bins)}}
                logger.log(step, metrics)
                logger.step(step, steps_since, loss=f"{mean_loss:.4f}", img_s=f"{metrics['img_s']:.0f}")
                if spikes.update(mean_loss):
                    logger.write(f"step {step}: loss spike {mean_loss:.4f} (running average {spikes.avg:.4f})")
                steps_since, t_last = 0, time.time()
                last_loss = mean_loss
            healthy = guard.consecutive == 0  # never checkpoint in the middle of a non-finite streak
            if healthy and tcfg.checkpoint_every and step % tcfg.checkpoint_every == 0 and step < tcfg.max_steps:
                last_ckpt = save(step)
            if tcfg.sample_every and step % tcfg.sample_every == 0 and step < tcfg.max_steps:
                last_eval = (step, run_eval(step))
            if stop.requested(dist_info.enabled) and step < tcfg.max_steps:
                logger.close()
                if last_ckpt is None or not str(last_ckpt).endswith(f"step_{step:07d}"):
                    save(step)
                log.warning("stop signal: checkpoint of step %d saved; exiting with code %d (run again to resume)", step, PREEMPTED_EXIT_CODE)
                raise SystemExit(PREEMPTED_EXIT_CODE)
    finally:
        stop.uninstall()

    # ---- the end: final checkpoint (unless resumed at the end already) and evaluation
    logger.close()
    if step > start_step:
        if last_ckpt is None or not str(last_ckpt).endswith(f"step_{step:07d}"):
            last_ckpt = save(step)
    else:  # resumed a run that had already finished: nothing to train
        last_ckpt = ckpt.latest_checkpoint(ckpt_root)
    if last_eval is not None and last_eval[0] == step:  # stopped right after an evaluation (train.stop_after)
        result = last_eval[1]
    else:
        result = run_eval(step) if tcfg.sample_every else {}
    summary = {
        "stage": cfg.stage.name,
        "step": step,
        "steps_this_run": step - start_step,
        "seconds": round(time.time() - t_start, 1),
        "final_loss": last_loss,
        "skipped_steps": guard.skipped_total,
        "world_size": dist_info.world_size,
        "replica_divergence": check_replicas(step),
        "first_batch_overlap": first_batch_overlap,
        "checkpoint": str(last_ckpt) if last_ckpt else None,
        **{f"eval_{k}": v for k, v in result.items()},
    }
    if dist_info.is_main:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        log.info("done: %s", json.dumps(summary))
    return summary
