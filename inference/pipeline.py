"""The one sampling function: model + autoencoder + condition -> images.

Training previews, the command-line sampler, the evaluator and the Gradio app all call
:func:`generate`, so the same checkpoint, condition, seed and settings give the same pixels
everywhere. Initial noise comes from a CPU generator seeded with ``seed`` (then moved to the
device), so it does not depend on the device. :class:`Pipeline` is a checkpoint made ready to
sample: its model, autoencoder, conditioning and sampling defaults, all read from its meta.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from flow.objectives import FLOW, SCHEDULER_SOLVERS, Objective, prediction
from flow.consistency import consistency_sample
from flow.sampling import guided_velocity, sample, sample_with_scheduler
from inference.conditioning import Conditioning, from_meta
from models.cli import DTYPE_NAMES


@dataclass
class SampleSettings:
    """steps (`int`), cfg_scale (`float`, 1 = no guidance), solver (`str`: an ODE solver of flow/sampling.py,
    or dpm++ / ddim through diffusers' schedulers), shift (`float`), seed (`int`); objective: what the
    model predicts (flow/objectives.py), the checkpoint's, not a choice; control_scale (`float`): a
    ControlNet's conditioning scale (its residuals times this; 0 = the base alone)."""

    steps: int = 20
    cfg_scale: float = 4.0
    solver: str = "euler"
    shift: float = 1.0
    seed: int = 0
    objective: Objective = FLOW
    control_scale: float = 1.0

    @classmethod
    def from_meta(cls, sampling: dict, objective: dict | None = None, **overrides: Any) -> "SampleSettings":
        """A checkpoint's sampling defaults (meta["sampling"]) and objective (meta["objective"]), with every
        override that is not None."""
        names = {f.name for f in fields(cls)} - {"objective"}
        base = cls(**{k: v for k, v in (sampling or {}).items() if k in names}, objective=Objective.from_meta(objective))
        return replace(base, **{k: v for k, v in overrides.items() if v is not None})

    def to_dict(self) -> dict:
        return {**asdict(self), "objective": self.objective.to_meta()}


def call_model(model: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: dict[str, Any]) -> torch.Tensor:
    """``model(x, t, **cond)``: a condition is the model's keyword arguments (inference/conditioning.py)."""
    return model(x, t, **cond)


TEXT_KEYS = ("encoder_hidden_states", "encoder_attention_mask")


def prepare_condition(model: nn.Module, cond: dict[str, Any]) -> dict[str, Any]:
    """A text condition with the model's step-independent text work done once (``MMDiT.cache_text``:
    caption projection, cross-attention keys/values), for a sampling loop that reuses it every step;
    other conditions, and models without a cache, pass through unchanged."""
    cache_text = getattr(model, "cache_text", None)
    if cache_text is None or "encoder_hidden_states" not in cond:
        return cond
    rest = {k: v for k, v in cond.items() if k not in TEXT_KEYS}
    return {**rest, "text_cache": cache_text(cond["encoder_hidden_states"], cond.get("encoder_attention_mask"))}


def initial_noise(n: int, latent_shape: tuple[int, ...], seed: int, device, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n, *latent_shape), generator=g).to(device=device, dtype=dtype)


DTYPES = dict(zip(DTYPE_NAMES, (torch.float32, torch.bfloat16, torch.float16)))


def pick_device(name: str | torch.device | None) -> torch.device:
    """``auto`` (or None): the GPU when there is one; otherwise the device named (cpu, cuda, cuda:1, ...)."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _cast(cond: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    return {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in cond.items()}


@torch.no_grad()
def generate(
    model: nn.Module,
    autoencoder: nn.Module,
    cond: dict[str, Any],
    uncond: dict[str, Any] | None,
    latent_shape: tuple[int, int, int],
    settings: SampleSettings,
    device: torch.device | str = "cpu",
    return_trajectory: bool = False,
    noise: torch.Tensor | None = None,
    callback=None,
):
    """Sample images (N, 3, H, W) in [-1, 1] for a batch of conditions.

    ``cond`` / ``uncond`` are the model's condition keyword arguments (inference/conditioning.py):
    ``{class_labels (N,)}`` for ccDiT; ``{encoder_hidden_states (N, L, D), encoder_attention_mask
    (N, L)}`` for mmDiT. ``uncond`` (the null condition) is used when cfg_scale != 1. The model runs
    in its own dtype (bf16 / fp16 weights: inputs cast to match); the ODE is integrated in fp32.
    ``noise``: the initial noise (default: from ``settings.seed``). ``callback(i)`` after each model
    evaluation (progress).
    """
    n = len(next(iter(cond.values())))
    settings.objective.check_solver(settings.solver)
    if "control" in cond:  # a ControlNet's scale, the same for both halves of guidance
        cond = {**cond, "control_scale": float(settings.control_scale)}
        uncond = {**uncond, "control_scale": float(settings.control_scale)} if uncond is not None else None
    if noise is None:
        noise = initial_noise(n, latent_shape, settings.seed, device)
    dtype = next(model.parameters()).dtype
    if dtype != torch.float32:
        cond, uncond = _cast(cond, dtype), (_cast(uncond, dtype) if uncond is not None else None)
    calls = [0]

    def velocity(x, t, c):
        v = prediction(call_model(model, x.to(dtype), t, c).float(), x.shape[1])
        if callback is not None:
            calls[0] += 1
            callback(calls[0])
        return v

    if settings.solver == "lcm":  # few-step consistency sampling (a distilled student: its guidance is an input)
        if return_trajectory:
            raise ValueError("the denoising strip (return_trajectory) needs solver='euler'")
        prepare = lambda c: prepare_condition(model, c)  # noqa: E731
        if getattr(getattr(model, "config", None), "guidance_embed", False):
            w = torch.full((n,), float(settings.cfg_scale), device=noise.device)
            v = guided_velocity(velocity, {**cond, "guidance": w}, None, 1.0, prepare)
        else:  # a model without the guidance input: the usual guided velocity
            v = guided_velocity(velocity, cond, uncond, settings.cfg_scale, prepare)
        return autoencoder.decode(consistency_sample(v, noise, settings.steps, settings.shift, settings.seed))
    if settings.solver in SCHEDULER_SOLVERS:
        if return_trajectory:
            raise ValueError("the denoising strip (return_trajectory) needs solver='euler'")
        out = sample_with_scheduler(velocity, noise, cond, settings.objective.scheduler(settings.solver, settings.shift),
                                    settings.steps, uncond, settings.cfg_scale, prepare=lambda c: prepare_condition(model, c))
        return autoencoder.decode(out)
    out = sample(
        velocity,
        noise,
        cond,
        uncond,
        cfg_scale=settings.cfg_scale,
        steps=settings.steps,
        shift=settings.shift,
        solver=settings.solver,
        return_trajectory=return_trajectory,
        prepare=lambda c: prepare_condition(model, c),
    )
    if return_trajectory:
        z, traj = out
        return autoencoder.decode(z), [autoencoder.decode(x) for x in traj]
    return autoencoder.decode(out)


def latent_shape(meta: dict) -> tuple[int, int, int]:
    """(C, H, W) of the latents a checkpoint's model was built for."""
    mc = meta["model_config"]
    return (mc["in_channels"], mc["input_size"], mc["input_size"])


def latent_shape_for(meta: dict, downsample: int, height: int, width: int,
                     max_side_factor: int | None = None) -> tuple[int, int, int]:
    """(C, H, W) latents for a height x width pixel image from this checkpoint; ValueError, saying what
    is possible, when both sides are not multiples of downsample x patch (or exceed ``max_side_factor``
    x the trained side), or a ccDiT (fixed position grid) is asked for another size than its own."""
    c, gh, gw = latent_shape(meta)
    unit = downsample * int(meta["model_config"]["patch_size"])
    limit = max_side_factor * max(gh, gw) * downsample if max_side_factor else None
    if min(height, width) <= 0 or height % unit or width % unit or (limit and max(height, width) > limit):
        raise ValueError(f"resolution {height}x{width} is not possible here: both sides must be positive multiples of {unit} "
                         f"(autoencoder x patch)" + (f" and at most {limit}" if limit else ""))
    if meta["family"] == "ccdit" and (height, width) != (gh * downsample, gw * downsample):
        raise ValueError(f"this {meta['stage']} ccDiT draws only {gh * downsample}x{gw * downsample} images (its position grid is fixed)")
    return c, height // downsample, width // downsample


def load_model(ckpt_dir, use_ema: bool = True, device: torch.device | str = "cpu"):
    """A checkpoint directory -> (model in eval mode, autoencoder, meta). Nothing else is needed:
    the checkpoint's meta.json names the model family, its full config and the autoencoder."""
    from models.autoencoder import load_autoencoder
    from models.checkpoint import checkpoint_model, read_meta

    meta = read_meta(ckpt_dir)
    model = checkpoint_model(ckpt_dir, meta, use_ema)
    ae = meta["autoencoder"]
    autoencoder = load_autoencoder(ae["name"], ae.get("subfolder"))
    if (autoencoder.scaling_factor, autoencoder.shift_factor) != (ae["scaling_factor"], ae["shift_factor"]):
        raise ValueError(
            f"the autoencoder {ae['name']} now has scaling {autoencoder.scaling_factor} / shift {autoencoder.shift_factor}, "
            f"but the model was trained with {ae['scaling_factor']} / {ae['shift_factor']}"
        )
    return model.to(device).eval(), autoencoder.to(device), meta


@dataclass
class Pipeline:
    """A checkpoint ready to sample: ``Pipeline.load(path)(inputs, settings)`` -> images.

    ``inputs`` are what a user types, parsed by the checkpoint's conditioning (class names or ids,
    prompts); ``settings`` default to the checkpoint's own (``defaults``)."""

    path: Path
    model: nn.Module
    autoencoder: nn.Module
    meta: dict
    conditioning: Conditioning
    device: torch.device | str = "cpu"

    @classmethod
    def load(cls, ckpt, use_ema: bool = True, device: torch.device | str | None = "cpu", dtype: str = "fp32") -> "Pipeline":
        """``device``: cpu, cuda, cuda:1, ... or ``auto`` (the GPU when there is one); ``dtype``: the model's
        weights, fp32 / bf16 / fp16. Raises models.checkpoint.CheckpointError (a missing or damaged
        checkpoint), ConditioningError, or ValueError (an unknown dtype)."""
        from models.checkpoint import resolve

        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r}: expected one of {sorted(DTYPES)}")
        device = pick_device(device)
        model, autoencoder, meta = load_model(ckpt, use_ema, device)
        return cls(resolve(ckpt), model.to(DTYPES[dtype]), autoencoder, meta, from_meta(meta).bind(autoencoder), device)

    def defaults(self, **overrides: Any) -> SampleSettings:
        return SampleSettings.from_meta(self.meta.get("sampling") or {}, self.meta.get("objective"), **overrides)

    @property
    def downsample(self) -> int:
        return int(getattr(self.autoencoder, "downsample", 1))

    def latent_shape(self, height: int | None = None, width: int | None = None, max_side_factor: int | None = None):
        """(C, H, W) for a height x width pixel image (ValueError saying what is possible); the trained size by default."""
        if height is None and width is None:
            return latent_shape(self.meta)
        _, gh, gw = latent_shape(self.meta)
        return latent_shape_for(self.meta, self.downsample, height or gh * self.downsample, width or gw * self.downsample,
                                max_side_factor)

    def __call__(self, values: list, settings: SampleSettings, negative: str | None = None,
                 shape: tuple[int, int, int] | None = None, return_trajectory: bool = False, batch_size: int | None = None,
                 callback=None):
        """Images (N, 3, H, W) in [-1, 1] for parsed ``values`` (``conditioning.parse``), one per value,
        sampled ``batch_size`` at a time (default: all at once); the noise is drawn for all N first, so
        the images do not depend on the batch size."""
        shape = shape or self.latent_shape()
        noise = initial_noise(len(values), shape, settings.seed, self.device)
        step = batch_size or len(values)
        outs = []
        for i in range(0, len(values), step):
            cond, uncond = self.conditioning.guided(values[i:i + step], self.device, negative)
            outs.append(generate(self.model, self.autoencoder, cond, uncond, shape, settings, self.device, return_trajectory,
                                 noise[i:i + step], callback))
        if return_trajectory:
            return torch.cat([o[0] for o in outs]), [torch.cat(xs) for xs in zip(*(o[1] for o in outs))]
        return torch.cat(outs)
