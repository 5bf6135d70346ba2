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
from data.stage import own_captions, stage_shards
from flow.objectives import FLOW, SCHEDULER_SOLVERS, Objective
from inference.conditioning import (ClassConditioning, Conditioning, ConditioningError, ControlConditioning, TextConditioning,
                                    kind_of)
from models.autoencoder import load_autoencoder
from models.checkpoint import CheckpointError, read_meta
from models.presets import MODEL_CLASSES, SHAPE_KEYS, check_shape, model_config, preset_fields
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
    objective: what the model learns to predict (flow/objectives.py; the init checkpoint's when
    ``train.objective`` is null, else rectified flow).
    """

    run_dir: Path
    micro_batch: int
    data_path: Path
    manifest: dict
    autoencoder: nn.Module
    conditioning: Conditioning
    model_config: Any
    shift: float
    objective: Objective = FLOW

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
        out.train.objective = self.objective.kind
        for key in ("base_size", "pos_grid"):
            if key in out.model:
                out.model[key] = getattr(self.model_config, key)
        return OmegaConf.to_yaml(out, resolve=True)


def resolve(cfg: DictConfig, dist_info: DistInfo, run_dir: Path) -> RunSpec:
    """Check the config, build or find the data, and resolve the run spec. Order matters for the
    random stream: the model is built after this, from the seed set here."""
    check_known_keys(cfg)
    micro = check_batch(cfg, dist_info.world_size)
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    kind = check_family(cfg)
    init_meta = init_checkpoint_meta(cfg.stage.get("init_from"), cfg.stage.name)
    shift = cfg.train.timestep.shift
    if shift is None:  # the init checkpoint's (reparameterize.py applies SD3's rule at 2->3)
        shift = float((init_meta.get("sampling") or {}).get("shift", 1.0))
    path, manifest = stage_shards(cfg.data, cfg.seed, dist_info.is_main, lambda: barrier(dist_info), log.info)
    data_from_manifest(cfg, manifest, path)  # before anything is loaded: what the manifest names is what loads
    autoencoder = load_autoencoder(cfg.data.autoencoder, cfg.data.autoencoder_subfolder).to(dist_info.device)
    size = cfg.data.image_size
    if size % autoencoder.downsample:
        raise ConfigError(f"data.image_size={size} is not divisible by the autoencoder's downsampling ({autoencoder.downsample})")
    latent_shape = (autoencoder.latent_channels, size // autoencoder.downsample, size // autoencoder.downsample)
    try:  # impossible shapes fail before any weight is allocated
        check_shape(cfg.model.family, cfg.model.preset, latent_shape[1], model_shape(cfg, init_meta))
    except ValueError as e:
        raise ConfigError(f"model (preset {cfg.model.preset}, data.image_size={size}): {e}") from e
    check_data(cfg, path, manifest, autoencoder, latent_shape)
    conditioning = make_conditioning(cfg, kind, path, manifest, autoencoder)
    mcfg = build_model_config(cfg, autoencoder, conditioning, init_meta)
    objective = resolve_objective(cfg, init_meta)
    check_distill(cfg, init_meta, objective)
    return RunSpec(run_dir, micro, path, manifest, autoencoder, conditioning, mcfg, float(shift), objective)


def lora_spec(cfg: DictConfig, use_fsdp: bool):
    """``train.lora``, checked: adapters need a base to adapt (stage.init_from), plain linears and DDP."""
    from models.adapters import LoraSpec

    spec = LoraSpec.from_config(cfg.train.get("lora"))
    if not spec.enabled:
        return spec
    problems = []
    if not cfg.stage.get("init_from"):
        problems.append("stage.init_from is not set: adapters fine-tune a trained base (a checkpoint, an imported PixArt, "
                        "or a reparameterized init)")
    if cfg.precision.linear != "torch":
        problems.append(f"precision.linear={cfg.precision.linear}: peft wraps torch's nn.Linear, and the FP8 backends replace "
                        "those layers; fine-tune adapters with precision.linear=torch (bf16 autocast on GPU), or train the "
                        "whole model (train.lora.rank=0) in FP8")
    if use_fsdp:
        problems.append("train.parallel=fsdp: adapters are megabytes and the frozen base is not sharded with them here; "
                        "use train.parallel=ddp")
    if spec.rank < 0 or spec.dropout < 0 or spec.dropout >= 1:
        problems.append(f"rank {spec.rank} / dropout {spec.dropout}: expected rank >= 0 and 0 <= dropout < 1")
    if problems:
        raise ConfigError("train.lora.rank=%d: " % spec.rank + "; ".join(problems))
    return spec


def routing_spec(cfg: DictConfig, model_config):
    """``train.routing`` as a checked :class:`models.routing.Routing`, or None when off (ratio 0)."""
    from models.routing import Routing

    r = cfg.train.get("routing")
    if not r or not r.ratio:
        if r and (r.get("mode", "route") != "route" or r.get("restart_ema") or r.get("until") is not None):
            log.warning("train.routing.ratio is 0: routing is off, so train.routing.mode/until/restart_ema do nothing")
        return None
    depth = model_config.depth
    mode = r.get("mode", "route")
    if mode not in ("route", "mask"):
        raise ConfigError(f"train.routing.mode={mode!r}: expected route (TREAD: the skipped tokens come back) or mask "
                          "(deferred masking: they are dropped and the loss counts the kept ones)")
    mask = mode == "mask"
    # null: up to the last block (a 2-block model: through it); masking: to the end
    end = (depth if mask else max(int(r.start) + 1, depth - 1)) if r.end is None else int(r.end)
    routing = Routing(float(r.ratio), int(r.start), end, mask)
    problems = []
    try:
        routing.check(depth)
    except ValueError as e:
        problems.append(str(e))
    if getattr(model_config, "control_blocks", 0):
        problems.append("a ControlNet run: the control residuals cover every token; train it without routing")
    if cfg.train.get("distill") and cfg.train.distill.enabled:
        problems.append("a distillation run: its loss calls the student itself; distill without routing")
    until = r.get("until")
    if until is not None and int(until) < 1:
        problems.append(f"until {until}: the first step trained on every token, at least 1 (to train without routing set ratio 0)")
    elif until is not None and int(until) >= cfg.train.max_steps:
        log.warning("train.routing.until=%s is not before train.max_steps=%s: every step of this run is routed", until, cfg.train.max_steps)
    restart = bool(r.get("restart_ema"))
    if restart and until is None:
        problems.append("restart_ema restarts the EMA's warm-up at the dense finish: set train.routing.until too")
    elif restart and not cfg.train.get("ema_warmup", True):
        problems.append("restart_ema restarts the EMA's warm-up, which train.ema_warmup=false switches off")
    elif restart and align_after(cfg, int(until)):
        problems.append(f"restart_ema with train.align on past step {until}: the alignment's teacher is the EMA, which the "
                        f"restart would make the student itself; set train.align.until={until} or lower")
    if problems:
        raise ConfigError(f"train.routing (ratio {r.ratio}, start {r.start}, end {r.end}): " + "; ".join(problems))
    return routing


@dataclass(frozen=True)
class LowRes:
    """``train.lowres`` checked: steps before ``until`` train on the latents average-pooled by ``factor``."""

    factor: int
    until: int
    restart_ema: bool

    def factor_at(self, step: int) -> int:
        return self.factor if step < self.until else 1


def lowres_spec(cfg: DictConfig, spec: RunSpec) -> LowRes | None:
    """``train.lowres`` as a checked :class:`LowRes`, or None when off (factor 1)."""
    r = cfg.train.get("lowres")
    if not r or int(r.factor) == 1:
        if r and r.get("until") is not None:
            log.warning("train.lowres.factor is 1: the low-resolution warm-up is off, so train.lowres.until does nothing")
        return None
    factor, until, restart = int(r.factor), r.get("until"), bool(r.get("restart_ema", True))
    problems = []
    if factor < 2:
        problems.append(f"factor {factor}: the latents are pooled by a whole number from 2 (1 = off)")
    if until is None:
        problems.append("set train.lowres.until, the step the model starts training at its own resolution: a run that never "
                        "does would not learn the size it samples at")
    elif int(until) < 1:
        problems.append(f"until {until}: the first full-resolution step, at least 1 (to train without the warm-up set factor 1)")
    elif int(until) >= cfg.train.max_steps:
        log.warning("train.lowres.until=%s is not before train.max_steps=%s: this run trains at low resolution throughout",
                    until, cfg.train.max_steps)
    p, down = spec.model_config.patch_size, spec.autoencoder.downsample
    buckets = spec.manifest.get("buckets") if is_bucketed(spec.manifest) else None
    sizes = ([tuple(int(v) // down for v in b.split("x")) for b in buckets] if buckets else [spec.latent_shape[1:]])
    bad = sorted({f"{h}x{w}" for h, w in sizes if h % (factor * p) or w % (factor * p)}) if factor >= 2 else []
    if bad:
        problems.append(f"latents of {', '.join(bad)} do not pool by {factor} into whole {p}x{p} patches: each side must be a "
                        f"multiple of {factor * p}")
    if restart and not cfg.train.get("ema_warmup", True):  # on by default: no reason to refuse a fine-tune's config
        log.warning("train.lowres.restart_ema restarts the EMA's warm-up, which train.ema_warmup=false switches off: "
                    "the EMA keeps its decay through the switch")
        restart = False
    if align_after(cfg, 0):
        problems.append("train.align's teacher is the EMA, which runs at full resolution only (as sampling does); use one of the two")
    if cfg.train.get("repa") and cfg.train.repa.get("encoder"):
        problems.append("train.repa's targets are the encoder's features on the full-resolution token grid; use one of the two")
    if cfg.train.compile:
        problems.append("train.compile: the graph would be built again, with dynamic shapes, at the switch of sizes; set "
                        "train.compile=false")
    if getattr(spec.model_config, "control_blocks", 0):
        problems.append("a ControlNet run: its control images are at full resolution; train it without the warm-up")
    if cfg.train.get("distill") and cfg.train.distill.enabled:
        problems.append("a distillation run starts from a trained teacher at full resolution; distill without the warm-up")
    if problems:
        raise ConfigError(f"train.lowres (factor {r.factor}, until {until}): " + "; ".join(problems))
    return LowRes(factor, int(until), restart)


def align_after(cfg: DictConfig, step: int) -> bool:
    """Whether self-alignment is on at ``step``."""
    a = cfg.train.get("align")
    return bool(a and a.weight) and (a.get("until") is None or int(a.until) > step)


def align_spec(cfg: DictConfig, model_config, routing, use_fsdp: bool):
    """``train.align`` as checked :class:`training.alignment.AlignSettings`, or None when off (weight 0)."""
    from training.alignment import AlignSettings

    a = cfg.train.get("align")
    if not a or not a.weight:
        return None
    settings = AlignSettings.from_config(a)
    problems = alignment_problems(cfg, model_config, routing, settings, settings.student_block, "train.align.student_block",
                                  "train.align")
    if use_fsdp:
        problems.append("train.parallel=fsdp: the EMA teacher is not gathered for its forward here; use train.parallel=ddp")
    if problems:
        raise ConfigError(f"train.align (weight {a.weight}): " + "; ".join(problems))
    return settings


def alignment_problems(cfg: DictConfig, model_config, routing, settings, block: int, key: str, switch: str) -> list[str]:
    """What is wrong with an alignment term's ``settings`` (self-alignment, REPA: their own ``check``) and what keeps it
    from reading ``block``'s output in this run."""
    problems = []
    try:
        settings.check(model_config.depth)
    except ValueError as e:
        problems.append(str(e))
    if routing is not None and routing.start <= block < routing.end:
        outside = routing.start - 1 if routing.start else routing.end if routing.end < model_config.depth else None
        problems.append(f"{key.rsplit('.', 1)[-1]} {block} is inside the routed span (blocks {routing.start}-"
                        f"{routing.end - 1}), where it sees only the kept tokens: "
                        + (f"choose a block outside it ({key}={outside}) or " if outside is not None else "")
                        + f"start the span later (train.routing.start={block + 1})")
    if cfg.train.get("distill") and cfg.train.distill.enabled:
        problems.append(f"a distillation run has its own loss; distill without {switch}")
    if getattr(model_config, "control_blocks", 0):
        problems.append(f"a ControlNet run trains the copies only; train it without {switch}")
    if cfg.train.compile:
        problems.append("train.compile: the features are caught by hooks that a compiled graph does not run; set train.compile=false")
    return problems


def repa_spec(cfg: DictConfig, model_config, routing, use_fsdp: bool):
    """``train.repa`` as checked :class:`training.repa.RepaSettings`, or None when off (no encoder)."""
    from training.repa import RepaSettings

    r = cfg.train.get("repa")
    if not r or not r.get("encoder"):
        return None
    settings = RepaSettings.from_config(r)
    problems = alignment_problems(cfg, model_config, routing, settings, settings.block, "train.repa.block", "train.repa")
    if align_after(cfg, 0):
        problems.append("train.align is on too: use one alignment term at a time (train.align.weight=0)")
    if use_fsdp:
        problems.append("train.parallel=fsdp: the projector is kept beside the sharded model only under DDP here; use "
                        "train.parallel=ddp")
    if problems:
        raise ConfigError(f"train.repa (encoder {r.encoder}): " + "; ".join(problems))
    return settings


def check_distill(cfg: DictConfig, init_meta: dict, objective: Objective) -> None:
    """``train.distill``: a flow teacher to distill (stage.init_from), and a student that takes the guidance scale."""
    d = cfg.train.get("distill")
    if not d or not d.enabled:
        return
    problems = []
    if not cfg.stage.get("init_from"):
        problems.append("stage.init_from is not set: it is the teacher (a text checkpoint)")
    elif objective.kind != "flow":
        problems.append(f"the teacher predicts {objective.kind}: consistency distillation here runs on the flow ODE; "
                        "fine-tune it as a flow first (train.objective=flow)")
    if cfg.stage.conditioning != "text":
        problems.append(f"stage conditioning {cfg.stage.conditioning!r}: the teacher's guidance needs text and its null prompt")
    if cfg.train.lora.rank and cfg.model.get("guidance_embed"):
        problems.append("train.lora.rank > 0 with model.guidance_embed: the guidance embedding is new and would be trained whole; "
                        "LCM-LoRA distills into adapters alone: set model.guidance_embed=false")
    if cfg.train.get("parallel", "ddp") == "fsdp":
        problems.append("train.parallel=fsdp: the teacher and the target network are whole copies on every rank here; "
                        "use train.parallel=ddp")
    if not 1 <= d.teacher_steps <= 1000 or d.w_min > d.w_max or d.w_min < 0:
        problems.append(f"teacher_steps {d.teacher_steps} (1-1000), w range [{d.w_min}, {d.w_max}] (0 <= w_min <= w_max)")
    if problems:
        raise ConfigError("train.distill: " + "; ".join(problems))
    if not cfg.model.get("guidance_embed") and cfg.train.sample.cfg_scale != 1.0:
        log.info("train.distill without model.guidance_embed: the student learns the guided trajectories for w in [%g, %g] "
                 "without being told w (LCM-LoRA); its samples run without guidance (train.sample.cfg_scale %g -> 1)",
                 d.w_min, d.w_max, cfg.train.sample.cfg_scale)
        cfg.train.sample.cfg_scale = 1.0


def resolve_objective(cfg: DictConfig, init_meta: dict | None) -> Objective:
    """``train.objective``: null continues the init checkpoint's (an imported PixArt predicts DDPM noise),
    else rectified flow; set, it names the kind (an epsilon run keeps the init's noise schedule)."""
    init = Objective.from_meta((init_meta or {}).get("objective"))
    kind = cfg.train.get("objective")
    try:
        objective = init if kind in (None, init.kind) else Objective(kind)
    except ValueError as e:
        raise ConfigError(f"train.objective: {e}") from e
    if kind is not None and kind != init.kind and init_meta:
        log.warning("train.objective=%s, but the init checkpoint was trained with %s: the model starts from "
                    "predictions of another kind and must relearn its output", kind, init.kind)
    solver = cfg.train.sample.solver
    if objective.kind == "epsilon" and solver not in SCHEDULER_SOLVERS:
        log.info("train.sample.solver=%s integrates a flow; this run predicts DDPM noise: its samples use dpm++", solver)
        cfg.train.sample.solver = "dpm++"
    log.info("objective: %s", objective.kind + (f" (DDPM, {objective.num_train_timesteps} steps, betas "
                                                 f"{objective.beta_schedule} {objective.beta_start}-{objective.beta_end})"
                                                 if objective.kind == "epsilon" else " (rectified flow)"))
    return objective


# ---------------------------------------------------------------- checks
def check_known_keys(cfg: DictConfig) -> None:
    """Every key of a typed group is one its schema declares. Struct mode already refuses unknown keys,
    except those added with '+' (``+model.patch_sise=4``), which nothing would read: refused here."""
    from training.schema import SCHEMAS

    unknown = []

    def walk(node, schema, prefix: str) -> None:
        known = {f.name: f for f in fields(schema)}
        for key in node:
            if key not in known:
                unknown.append((f"{prefix}.{key}", sorted(known)))
            elif isinstance(node._get_node(key), DictConfig) and is_dataclass_type(known[key].default_factory):
                walk(node._get_node(key), known[key].default_factory, f"{prefix}.{key}")  # (not node[key]: it may be ???)

    for group, schema in SCHEMAS.items():
        if group in cfg:
            walk(cfg._get_node(group), schema(cfg._get_node(group)), group)
    if unknown:
        raise ConfigError("; ".join(f"{k} is not a setting (nothing would read it); {k.rsplit('.', 1)[0]} has: {', '.join(names)}"
                                    for k, names in unknown))


def is_dataclass_type(obj) -> bool:
    from dataclasses import is_dataclass

    return isinstance(obj, type) and is_dataclass(obj)


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


BESIDE_THE_CURRICULUM = {"controlnet": "the frozen base", "distill": "the teacher"}  # stages that start from any text checkpoint


def init_checkpoint_meta(source: str | None, stage: str = "") -> dict:
    """The meta of ``stage.init_from`` (empty without one); a missing one says how to make it."""
    if not source:
        return {}
    if not Path(source).exists() and stage in BESIDE_THE_CURRICULUM:
        raise ConfigError(
            f"stage.init_from={source} does not exist. It is {BESIDE_THE_CURRICULUM[stage]}: a text checkpoint, such as "
            "make demo's runs/demo/stage2/checkpoints/latest (run `make demo` first), a stage 2-5 run of yours, or PixArt "
            "weights from scripts/import_pixart.py"
        )
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
def data_from_manifest(cfg: DictConfig, manifest: dict, path: Path) -> None:
    """Fill the data fields the config leaves null from the shards' manifest (``data=shards`` leaves them
    all null): the autoencoder, the image size, the classes, the text encoder. Values the config sets
    are kept and checked against the manifest (check_data). The filled config is what the run records."""
    d = cfg.data
    filled = {}

    def fill(key: str, value) -> None:
        if d.get(key) is None and value is not None:
            d[key] = value
            filled[key] = value

    if d.get("autoencoder") is None:
        fill("autoencoder", manifest.get("autoencoder"))
        fill("autoencoder_subfolder", manifest.get("autoencoder_subfolder"))
    size = manifest.get("image_size")
    spec = manifest.get("bucket_spec") or {}
    if size is None and spec.get("target_pixels"):  # bucketed data: the square of the same area, PixArt's base size
        step = int(spec.get("step") or 1)
        size = max(step, round(spec["target_pixels"] ** 0.5 / step) * step)
    fill("image_size", size)
    fill("num_classes", manifest.get("num_classes"))
    te = manifest.get("text_encoder") or {}
    fill("text_encoder", te.get("name"))
    fill("max_length", te.get("max_length"))
    if filled:
        log.info("from %s/manifest.json: %s", path, ", ".join(f"data.{k}={v}" for k, v in filled.items()))
    missing = [k for k in ("autoencoder", "image_size") if d.get(k) is None]
    if missing:
        raise ConfigError(f"{path}/manifest.json records no {' or '.join(missing)}: set " + " and ".join(f"data.{k}" for k in missing))
    if cfg.stage.conditioning == "class" and d.get("num_classes") is None:
        raise ConfigError(f"stage {cfg.stage.name} trains on class labels but {path} has none (its manifest records no "
                          "num_classes): prepare it from class folders or a table with a label column, or set data.num_classes")
    check_manifest(manifest, {"autoencoder": d.autoencoder}, where=str(path))  # before the config's autoencoder is loaded


def check_data(cfg: DictConfig, path: Path, manifest: dict, autoencoder: nn.Module, latent_shape: tuple[int, int, int]) -> None:
    """The shards' manifest agrees with this config (autoencoder and its scaling, latent shape, classes)."""
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


def eval_prompts(cfg: DictConfig, path: Path, manifest: dict) -> list[str]:
    """data.eval_prompts: a list; 'held_out' for the captions the data builder held out; null for those,
    or where the data holds none out, EVAL_PROMPTS of the data's own captions (seeded)."""
    spec = cfg.data.get("eval_prompts")
    held_out = list(manifest.get("held_out_captions") or [])
    if spec == "held_out":
        if not held_out:
            raise ConfigError(f"data.eval_prompts=held_out but {cfg.data.path} holds nothing out (build it with --holdout)")
        return held_out
    if spec is None:
        prompts = held_out or own_captions(path, manifest, EVAL_PROMPTS, cfg.seed)
        log.info("evaluation prompts (data.eval_prompts=null: %s): %s", "held out" if held_out else "the data's own captions",
                 "; ".join(prompts))
        return prompts
    return list(spec)


EVAL_PROMPTS = 8  # drawn from the data's own captions when data.eval_prompts is null and nothing is held out


def control_eval_values(cond: ControlConditioning, path: Path, manifest: dict, autoencoder: nn.Module, size: int) -> list:
    """A ControlNet run evaluates on the data's own first captions with their stored control maps (a
    prompt alone says nothing about the control), decoded to the control images a user would give;
    maps of the ``size`` x ``size`` pixel canvas the evaluation samples (bucketed data: the square bucket)."""
    from data.stage import own_controls
    from inference.conditioning import ControlPrompt

    buckets = manifest.get("buckets") or {}
    if buckets and f"{size}x{size}" not in buckets:  # before reading every map of every shard for none
        raise ConfigError(f"{path}: the ControlNet's evaluation samples the square {size}x{size} canvas (data.image_size), which "
                          f"this bucketed data lacks (its buckets: {', '.join(sorted(buckets))}); set data.image_size to the side "
                          "of a square bucket, or build the data with one")
    grid = size // autoencoder.downsample
    pairs = own_controls(path, manifest, cond.control_kind, EVAL_PROMPTS, (grid, grid))
    if not pairs:
        raise ConfigError(f"{path} has no {cond.control_kind} control map of the {size}x{size} canvas (data.image_size) to evaluate on")
    device = next(autoencoder.parameters(), torch.empty(0)).device  # pixel space has no weights: the CPU
    values = []
    with torch.no_grad():
        for prompt, raw in pairs:
            z = cond.normalize(torch.from_numpy(raw.astype("float32"))[None]).to(device)
            values.append(ControlPrompt(prompt, autoencoder.decode(z)[0].float().cpu()))
    log.info("evaluation (ControlNet): %d of the data's own captions with their %s maps", len(values), cond.control_kind)
    return values


def make_conditioning(cfg: DictConfig, kind: type[Conditioning], path: Path, manifest: dict,
                      autoencoder: nn.Module | None = None) -> Conditioning:
    try:
        if kind is ClassConditioning:
            return ClassConditioning(int(cfg.data.num_classes), manifest.get("class_names"))
        mix = cfg.data.get("caption_mix")
        text_args = (str(path), manifest, cfg.data.get("text_mode", "precomputed"), dict(mix) if mix else None)
        if kind is ControlConditioning:
            cond = ControlConditioning.for_training(*text_args, control_kind=cfg.data.get("control")).bind(autoencoder)
            cond.eval_values = control_eval_values(cond, path, manifest, autoencoder, int(cfg.data.image_size))
            cond.examples = [v.prompt for v in cond.eval_values]
        else:
            cond = TextConditioning.for_training(*text_args)
            cond.examples = eval_prompts(cfg, path, manifest)  # what the evaluation prompts, and the sampler offers as examples
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
        if value is None:
            value = init_config.get(key)  # a stage continues the architecture it starts from
        if value is not None:
            if value != preset[key]:
                log.info("model.%s=%s overrides the %s preset's %s", key, value, cfg.model.preset, preset[key])
            fields_[key] = value
    shape = model_shape(cfg, init_meta)
    changed = {k: v for k, v in shape.items() if v != preset[k]}
    if changed:
        log.info("model shape: %s instead of the %s preset's %s", ", ".join(f"{k}={v}" for k, v in changed.items()),
                 cfg.model.preset, ", ".join(f"{k}={preset[k]}" for k in changed))
    fields_.update(shape)
    if "pixels_per_latent" in {f.name for f in fields(config_cls)}:  # micro-conditions are in pixels
        fields_["pixels_per_latent"] = autoencoder.downsample
    for key in ("block", "micro_conditions", "base_size", "pos_grid", "micro_embedder"):
        value = cfg.model.get(key)
        if value is None and key in ("base_size", "pos_grid", "micro_embedder"):
            value = init_config.get(key)  # absent in older checkpoints: the default
        if value is not None:
            fields_[key] = value
    if init_config.get("micro_conditions") and "micro_embedder" not in fields_:
        fields_["micro_embedder"] = "mlp"  # an init saved before the PixArt-MS layout existed
    for key in ("out_channels", "interpolation_scale"):  # an imported model's (8 channels: learned variance)
        if init_config.get(key) is not None:
            fields_[key] = init_config[key]
    control = cfg.model.get("control_blocks")
    if control is None:
        control = init_config.get("control_blocks") or 0  # a ControlNet run continued from a ControlNet checkpoint
    if control or isinstance(conditioning, ControlConditioning):
        if not isinstance(conditioning, ControlConditioning):
            raise ConfigError(f"model.control_blocks={control}: a ControlNet trains on control maps; train it with "
                              "train_controlnet.py (stage conditioning 'control'), or set model.control_blocks=0")
        if not control:
            raise ConfigError("stage conditioning 'control' trains a ControlNet: set model.control_blocks to the number of "
                              "base blocks to copy (PixArt-δ: 13 of 28; the demo: 3 of 6)")
        if not cfg.stage.get("init_from"):
            raise ConfigError("a ControlNet trains beside a frozen base: set stage.init_from to a text checkpoint (a stage 2-5 "
                              "run, or PixArt weights from scripts/import_pixart.py)")
        fields_["control_blocks"] = int(control)
    guidance = cfg.model.get("guidance_embed")
    if guidance is None:
        guidance = bool(init_config.get("guidance_embed"))  # continuing a distilled student
    if guidance:
        fields_["guidance_embed"] = True
    config = model_config(cfg.model.family, cfg.model.preset, **fields_)
    if cfg.model.get("check_diffusers_export"):
        from models.diffusers_pixart import IncompatibleModel, check_exportable

        try:
            check_exportable(config)
        except IncompatibleModel as e:
            raise ConfigError(f"model.check_diffusers_export: {e}") from e
    return config


def model_shape(cfg: DictConfig, init_meta: dict | None = None) -> dict:
    """The shape fields that differ from the preset's source: ``model.<key>`` where set, else the init
    checkpoint's (a stage continues the architecture it starts from)."""
    init_config = (init_meta or {}).get("model_config") or {}
    shape = {}
    for key in SHAPE_KEYS:
        value = cfg.model.get(key)
        if value is None:
            value = init_config.get(key)
        if value is not None:
            shape[key] = value
    return shape


def conditioning_fields(conditioning: Conditioning) -> dict:
    """The architecture fields a conditioning fixes: the classes of a ccDiT, the text width of an mmDiT."""
    if isinstance(conditioning, ClassConditioning):
        return {"num_classes": conditioning.num_classes}
    return {"caption_channels": conditioning.width}
