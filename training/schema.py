"""The types of the config groups, as Hydra structured configs: a value of the wrong type is refused
when the config is composed, naming the key (``train.lr=abc``: "Value 'abc' of type 'str' could not
be converted to Float ... full_key: train.lr"), before anything runs.

Each group's YAML files start from their schema (``defaults: [<group>_schema, _self_]``); the
defaults here are the values the code assumes when a file leaves a key out, so a schema never
changes what a config means. Registered on import (training/config.py imports this module).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class TimestepSchema:
    logit_mean: float = 0.0
    logit_std: float = 1.0
    shift: Optional[float] = 1.0  # null: the init checkpoint's


@dataclass
class SampleSchema:
    steps: int = 20
    cfg_scale: float = 4.0
    solver: str = "euler"
    seed: int = 0


@dataclass
class WandbSchema:
    mode: Optional[str] = None
    project: str = "flowdit"


@dataclass
class LoraSchema:
    rank: int = 0  # 0: train the whole model; > 0: LoRA adapters of this rank on a frozen base (models/adapters.py)
    alpha: Optional[float] = None  # null: the rank (scale 1)
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out", "fc1", "fc2"])


@dataclass
class DistillSchema:
    enabled: bool = False  # train_distill.py: LCM distillation of stage.init_from (the teacher) into a few-step student
    teacher_steps: int = 32  # the teacher's coarse grid: one guided Euler step of it per sample (the skipped steps)
    w_min: float = 1.0  # guidance scales drawn per sample, uniformly; the student takes w as an input
    w_max: float = 6.0
    huber_c: float = 0.001  # pseudo-Huber loss constant (LCM's)


@dataclass
class RoutingSchema:
    ratio: float = 0.0  # TREAD token routing (models/routing.py): fraction of image tokens that skip the span; 0 = off
    start: int = 1  # first block of the span (sees only the kept tokens)
    end: Optional[int] = None  # first block after the span; null: depth - 1 (the last block sees every token; at depth 2: depth)
    until: Optional[int] = None  # train on every token from this step on (a short dense finish); null = route to the end
    restart_ema: bool = False  # at `until`, start the EMA's warm-up again: the finish's average forgets the routed weights
    mode: str = "route"  # route: the skipped tokens come back at `end`; mask: deferred masking, dropped for good, loss on the kept


@dataclass
class LowResSchema:
    factor: int = 1  # train on the latents average-pooled by this factor (a coarse warm-up); 1 = off
    until: Optional[int] = None  # full resolution from this step on (required with factor > 1)
    restart_ema: bool = True  # at `until`, start the EMA's warm-up again: the average forgets the coarse weights


@dataclass
class AlignSchema:
    weight: float = 0.0  # self-representation alignment (training/alignment.py); 0 = off
    student_block: int = 1  # this block's output, of the model being trained ...
    teacher_block: int = 3  # ... pulled toward this deeper block's output of the EMA model
    gap: float = 0.1  # the teacher sees the sample at t - gap: less noise
    until: Optional[int] = None  # switch the term off at this step; null = never


@dataclass
class RepaSchema:
    encoder: Optional[str] = None  # REPA (training/repa.py): a vision encoder by hub id or local folder; null = off
    subfolder: Optional[str] = None
    weight: float = 0.5  # the term's weight (REPA's lambda)
    block: int = 1  # this block's image tokens, through the projector, pulled toward the encoder's patch features
    projector_dim: int = 2048  # the projector MLP's width
    until: Optional[int] = None  # switch the term off at this step; null = never


@dataclass
class TrainSchema:
    global_batch_size: int = 256
    grad_accum: int = 1
    max_steps: int = 400000
    lr: float = 1e-4
    min_lr_ratio: float = 1.0
    warmup_steps: int = 1000
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    grad_clip: float = 1.0
    ema_decay: float = 0.9999
    ema_warmup: bool = True
    cond_dropout: float = 0.1
    timestep: TimestepSchema = field(default_factory=TimestepSchema)
    objective: Optional[str] = None  # flow | epsilon; null: the init checkpoint's, else flow
    lora: LoraSchema = field(default_factory=LoraSchema)
    distill: DistillSchema = field(default_factory=DistillSchema)
    routing: RoutingSchema = field(default_factory=RoutingSchema)
    lowres: LowResSchema = field(default_factory=LowResSchema)
    align: AlignSchema = field(default_factory=AlignSchema)
    repa: RepaSchema = field(default_factory=RepaSchema)
    log_every: int = 50
    sample_every: int = 5000
    checkpoint_every: int = 5000
    keep_last: int = 3
    keep_every: int = 0
    sample: SampleSchema = field(default_factory=SampleSchema)
    report_to: str = "none"
    wandb: WandbSchema = field(default_factory=WandbSchema)
    max_nonfinite_steps: int = 5
    spike_factor: float = 3.0
    activation_checkpointing: bool = False
    compile: bool = False
    compile_mode: str = "default"
    parallel: str = "ddp"
    stop_after: Optional[int] = None
    count_flops: bool = False


@dataclass
class PrecisionSchema:
    linear: str = "torch"
    autocast: str = "bf16"
    autocast_cpu: bool = False
    te_recipe: str = "auto"
    fuse_wgrad: bool = False


@dataclass
class CCDiTSchema:
    family: str = "ccdit"
    preset: str = MISSING
    qk_norm: Optional[bool] = None
    # The preset's shape, changed where set (null: the preset's, or the init checkpoint's)
    patch_size: Optional[int] = None
    depth: Optional[int] = None
    hidden_size: Optional[int] = None
    num_heads: Optional[int] = None
    mlp_ratio: Optional[float] = None


@dataclass
class MMDiTSchema(CCDiTSchema):
    family: str = "mmdit"
    block: Optional[str] = None
    micro_conditions: Optional[bool] = None
    micro_embedder: Optional[str] = None
    base_size: Optional[int] = None
    pos_grid: Optional[str] = None
    control_blocks: Optional[int] = None  # ControlNet: copies of the first N blocks; null: the init checkpoint's, else 0
    guidance_embed: Optional[bool] = None  # a distilled student's guidance-scale input; null: the init checkpoint's, else off
    check_diffusers_export: bool = False


@dataclass
class DataSchema:
    name: str = MISSING
    path: str = MISSING
    generate: bool = False
    num_samples: Optional[int] = None
    # null: what the shards' manifest records (training/setup.py data_from_manifest)
    image_size: Optional[int] = None
    autoencoder: Optional[str] = None
    autoencoder_subfolder: Optional[str] = None
    num_classes: Optional[int] = None
    shuffle_buffer: int = 1000
    interleave: int = 8
    num_workers: Optional[int] = None  # null: what the machine has (training/feed.py default_workers)
    evaluator: Any = None  # shapes | {kind: fid, reference: PATH, ...} | null
    eval_samples: int = 0
    eval_batch: int = 1024  # samples per sampling call at an evaluation (lower it if an FID-sized evaluation runs out of memory)
    max_bad_fraction: float = 0.01
    min_score: Optional[float] = None
    score_key: str = "aesthetic"
    buckets: Optional[Any] = None  # {target_pixels, step, max_ratio}
    eval_aspects: Optional[Any] = None  # [[h, w], ...]
    text_encoder: Optional[str] = None
    max_length: Optional[int] = None  # the demo builder's token limit; null: the manifest's
    text_mode: str = "precomputed"
    caption_mix: Optional[dict[str, float]] = None
    holdout: bool = False
    eval_prompts: Any = None  # a list of prompts, held_out, or null: held-out captions, else a sample of the data's own
    control: Optional[str] = None  # ControlNet runs: the stored control map to condition on (edges | mask; data/control.py)


@dataclass
class StageSchema:
    name: str = MISSING
    index: int = MISSING
    conditioning: str = MISSING
    init_from: Optional[str] = None


# Each typed group's schema, for the start-up check that no key was added that nothing reads
# (training/setup.py check_known_keys); the model's depends on its family.
SCHEMAS = {
    "train": lambda node: TrainSchema,
    "precision": lambda node: PrecisionSchema,
    "model": lambda node: MMDiTSchema if node.get("family") == "mmdit" else CCDiTSchema,
    "data": lambda node: DataSchema,
    "stage": lambda node: StageSchema,
}


def register() -> None:
    cs = ConfigStore.instance()
    for group, name, node in [("train", "train_schema", TrainSchema), ("precision", "precision_schema", PrecisionSchema),
                              ("model", "ccdit_schema", CCDiTSchema), ("model", "mmdit_schema", MMDiTSchema),
                              ("data", "data_schema", DataSchema)]:
        cs.store(group=group, name=name, node=node)
    cs.store(group="stage", name="stage_schema", node=StageSchema, package="stage")


register()
