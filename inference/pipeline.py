"""The one sampling function: model + autoencoder + condition -> images.

Training previews, the command-line sampler and the Gradio app all call
:func:`generate`, so the same checkpoint, condition, seed and settings give the
same pixels everywhere. Initial noise comes from a CPU generator seeded with
``seed`` (then moved to the device), so it does not depend on the device.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn as nn

from flow.sampling import sample


@dataclass
class SampleSettings:
    """steps (`int`), cfg_scale (`float`, 1 = no guidance), solver (`str`), shift (`float`), seed (`int`)."""

    steps: int = 20
    cfg_scale: float = 4.0
    solver: str = "euler"
    shift: float = 1.0
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def call_model(model: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
    """model(x, t, labels) for class conditions, model(x, t, **cond) for text (hidden states + mask)."""
    return model(x, t, **cond) if isinstance(cond, dict) else model(x, t, cond)


TEXT_KEYS = ("encoder_hidden_states", "encoder_attention_mask")


def prepare_condition(model: nn.Module, cond: Any) -> Any:
    """A text condition with the model's step-independent text work done once (``MMDiT.cache_text``:
    caption projection, cross-attention keys/values), for a sampling loop that reuses it every step;
    class ids, and models without a cache, pass through unchanged."""
    cache_text = getattr(model, "cache_text", None)
    if cache_text is None or not isinstance(cond, dict) or "encoder_hidden_states" not in cond:
        return cond
    rest = {k: v for k, v in cond.items() if k not in TEXT_KEYS}
    return {**rest, "text_cache": cache_text(cond["encoder_hidden_states"], cond.get("encoder_attention_mask"))}


def initial_noise(n: int, latent_shape: tuple[int, ...], seed: int, device, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n, *latent_shape), generator=g).to(device=device, dtype=dtype)


@torch.no_grad()
def generate(
    model: nn.Module,
    autoencoder: nn.Module,
    cond: Any,
    uncond: Any,
    latent_shape: tuple[int, int, int],
    settings: SampleSettings,
    device: torch.device | str = "cpu",
    return_trajectory: bool = False,
):
    """Sample images (N, 3, H, W) in [-1, 1] for a batch of conditions.

    ``cond`` / ``uncond`` are what the model takes as its condition: class ids
    (N,) for ccDiT; {encoder_hidden_states (N, L, D), encoder_attention_mask (N, L)}
    for mmDiT. ``uncond`` (the null condition) is used when cfg_scale != 1.
    """
    n = cond.shape[0] if torch.is_tensor(cond) else len(next(iter(cond.values())))
    noise = initial_noise(n, latent_shape, settings.seed, device)
    out = sample(
        lambda x, t, c: call_model(model, x, t, c).float(),
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


def checkpoint_model(ckpt_dir, meta: dict, use_ema: bool = True) -> nn.Module:
    """The model a checkpoint (with its ``meta``) describes, its weights loaded: EMA when asked and saved.
    Plain torch linears whatever precision.linear trained it: every backend keeps the same full-precision
    weights, FP8 (te, mxfp8_emulated) is a training-time choice, and TE need not be installed here."""
    from models.linear import load_portable
    from models.presets import build_model
    from training.checkpoint import load_weights

    model = build_model(meta["family"], {**meta["model_config"], "linear_backend": "torch"})
    load_portable(model, load_weights(ckpt_dir, ema=use_ema and meta.get("has_ema", False)))
    return model


def load_model(ckpt_dir, use_ema: bool = True, device: torch.device | str = "cpu"):
    """A checkpoint directory -> (model in eval mode, autoencoder, meta). Nothing else is needed:
    the checkpoint's meta.json names the model family, its full config and the autoencoder."""
    from models.autoencoder import load_autoencoder
    from training.checkpoint import read_meta

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


_ENCODERS: dict = {}


def text_encoder_for(meta: dict):
    """The frozen text encoder a text checkpoint was trained with (its meta names it), cached."""
    te = meta["conditioning"].get("text_encoder")
    if not te:
        raise ValueError(f"this is a {meta['conditioning']['type']}-conditioned checkpoint: it takes no prompts")
    key = (te["name"], te["max_length"])
    if key not in _ENCODERS:
        from data.text_embeddings import CachedEncoder
        from models.text_encoder import TextEncoder

        enc = CachedEncoder(TextEncoder(te["name"], max_length=te["max_length"]))
        if enc.width != te["width"]:
            raise ValueError(f"text encoder {te['name']} now has width {enc.width}; the model was trained on width {te['width']}")
        _ENCODERS[key] = enc
    return _ENCODERS[key]


def prompt_conditions(meta: dict, prompts: list[str], negative_prompt: str = "", device="cpu") -> tuple[dict, dict]:
    """Prompts -> (cond, uncond) for a text checkpoint. The negative prompt (default: the empty
    prompt, the null condition the model was trained with) takes the unconditional branch of CFG.
    Embeddings are rounded through fp16 as in the shards, so samples match the training previews."""
    enc = text_encoder_for(meta)
    hidden, mask = enc.batch(list(prompts) + [negative_prompt])
    n = len(prompts)
    cond = {"encoder_hidden_states": hidden[:n].to(device), "encoder_attention_mask": mask[:n].to(device)}
    uncond = {"encoder_hidden_states": hidden[n:].expand(n, -1, -1).to(device), "encoder_attention_mask": mask[n:].expand(n, -1).to(device)}
    return cond, uncond
