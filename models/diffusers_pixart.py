"""Weight interop between mmDiT's PixArt preset and diffusers' ``PixArtTransformer2DModel``
(PixArt-α and PixArt-Σ, with or without the PixArt-MS size / aspect-ratio micro-conditions).

Both directions are exact renames: no tensor changes shape or value. Requirements
(checked, with a message): the PixArt block, QK-norm off, MLP ratio 4, the stretched position
grid, and micro-conditions (if any) in PixArt-MS's layout (``micro_embedder="pixart"``).
Our model takes t in [0, 1]; diffusers takes the timestep t * 1000: the same numbers.
"""
from __future__ import annotations

import re

import torch

from models.mmdit import MMDiTConfig

# One table, both directions: our parameter-name prefix <-> diffusers'. {i} is a block index,
# {x} one of q, k, v; a row matches a name's start, and the rest of the name is kept.
_NAMES = [
    ("x_embedder.proj.", "pos_embed.proj."),
    ("t_embedder.linear_1.", "adaln_single.emb.timestep_embedder.linear_1."),
    ("t_embedder.linear_2.", "adaln_single.emb.timestep_embedder.linear_2."),
    ("t_block.1.", "adaln_single.linear."),
    ("micro_embedder.resolution_embedder.", "adaln_single.emb.resolution_embedder."),
    ("micro_embedder.aspect_ratio_embedder.", "adaln_single.emb.aspect_ratio_embedder."),
    ("y_embedder.linear_1.", "caption_projection.linear_1."),
    ("y_embedder.linear_2.", "caption_projection.linear_2."),
    ("blocks.{i}.attn.to_{x}.", "transformer_blocks.{i}.attn1.to_{x}."),
    ("blocks.{i}.attn.to_out.", "transformer_blocks.{i}.attn1.to_out.0."),
    ("blocks.{i}.cross_attn.to_{x}.", "transformer_blocks.{i}.attn2.to_{x}."),
    ("blocks.{i}.cross_attn.to_out.", "transformer_blocks.{i}.attn2.to_out.0."),
    ("blocks.{i}.mlp.fc1.", "transformer_blocks.{i}.ff.net.0.proj."),
    ("blocks.{i}.mlp.fc2.", "transformer_blocks.{i}.ff.net.2."),
    ("blocks.{i}.scale_shift_table", "transformer_blocks.{i}.scale_shift_table"),
    ("final_layer.scale_shift_table", "scale_shift_table"),
    ("final_layer.linear.", "proj_out."),
]
_FIELDS = {"{i}": r"(?P<i>\d+)", "{x}": r"(?P<x>[qkv])"}


def _rule(source: str, target: str) -> tuple[re.Pattern, str]:
    pattern = re.escape(source)
    for field, group in _FIELDS.items():
        pattern = pattern.replace(re.escape(field), group)
    return re.compile("^" + pattern + ("$" if not source.endswith(".") else "")), target


_RULES = [_rule(ours, theirs) for ours, theirs in _NAMES]  # ours -> diffusers
_INVERSE = [_rule(theirs, ours) for ours, theirs in _NAMES]  # diffusers -> ours


class IncompatibleModel(ValueError):
    """The model cannot be expressed exactly in the other library."""


def _rename(state: dict[str, torch.Tensor], rules) -> dict[str, torch.Tensor]:
    out = {}
    for name, tensor in state.items():
        for pattern, target in rules:
            m = pattern.match(name)
            if m:
                out[target.format(**m.groupdict()) + name[m.end():]] = tensor
                break
        else:
            raise IncompatibleModel(f"parameter {name!r} has no counterpart in the other model")
    return out


def check_exportable(config: MMDiTConfig) -> None:
    problems = []
    if getattr(config, "block", "pixart") != "pixart":
        problems.append(f"block={config.block!r} (diffusers' PixArt is the cross-attention block; use model.block=pixart)")
    if config.qk_norm:
        problems.append("qk_norm=True (diffusers' PixArt has no QK-norm; train with model.qk_norm=false)")
    if config.mlp_ratio != 4.0:
        problems.append(f"mlp_ratio={config.mlp_ratio} (diffusers' PixArt uses 4)")
    if getattr(config, "micro_conditions", False) and getattr(config, "micro_embedder", "mlp") != "pixart":
        problems.append("micro_embedder='mlp' (this model embeds size and aspect ratio with one MLP; diffusers' PixArt-MS "
                        "has PixArt's two embedders: train stage 4 from a 3to4 init of a width divisible by 3, which uses them)")
    if getattr(config, "pos_grid", "stretch") != "stretch":
        problems.append(f"pos_grid={config.pos_grid!r} (diffusers stretches each axis of non-square grids; "
                        "reparameterize 3to4 with --pos-grid stretch for an exportable model)")
    if getattr(config, "control_blocks", 0):
        problems.append(f"control_blocks={config.control_blocks} (a ControlNet: diffusers' PixArtTransformer2DModel holds the "
                        "base alone; sample it here, or export the base it was trained on)")
    if problems:
        raise IncompatibleModel("this mmDiT is not the PixArt-α preset diffusers can load: " + "; ".join(problems))


def diffusers_config(config: MMDiTConfig) -> dict:
    """Constructor kwargs of ``PixArtTransformer2DModel`` for the same architecture."""
    check_exportable(config)
    return dict(
        num_attention_heads=config.num_heads,
        attention_head_dim=config.hidden_size // config.num_heads,
        in_channels=config.in_channels,
        out_channels=config.out_channels or config.in_channels,
        num_layers=config.depth,
        cross_attention_dim=config.hidden_size,
        caption_channels=config.caption_channels,
        # diffusers derives the position grid's base from sample_size (base = sample_size / patch) and
        # interpolates other sizes onto it, as we do: a stage-3 model (trained on a larger grid over the
        # base range) exports with its base size; pipelines then default to that size, so pass height/width
        sample_size=(config.base_size or config.grid_size) * config.patch_size,
        patch_size=config.patch_size,
        interpolation_scale=config.interpolation_scale,
        use_additional_conditions=bool(getattr(config, "micro_conditions", False)),
        attention_bias=True,
        activation_fn="gelu-approximate",
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
        num_embeds_ada_norm=1000,
    )


# diffusers' settings that our mmDiT has exactly one value for: anything else is refused on import
_FIXED = dict(norm_type="ada_norm_single", activation_fn="gelu-approximate", attention_bias=True, upcast_attention=False,
              norm_elementwise_affine=False, norm_eps=1e-6, attention_type="default")


def mmdit_config_from_diffusers(cfg) -> MMDiTConfig:
    """Our config for a diffusers PixArt config (a dict or its FrozenDict); IncompatibleModel says what
    cannot map. PixArt-MS micro-conditions (diffusers' ``use_additional_conditions``, on by default at
    sample_size 128) come in as ``micro_conditions=True, micro_embedder="pixart"``."""
    cfg = dict(cfg)
    problems = [f"{k}={cfg[k]!r} (mmDiT has {v!r})" for k, v in _FIXED.items() if k in cfg and cfg[k] != v]
    heads, head_dim = cfg["num_attention_heads"], cfg["attention_head_dim"]
    hidden = heads * head_dim
    if cfg.get("cross_attention_dim") not in (None, hidden):
        problems.append(f"cross_attention_dim={cfg['cross_attention_dim']} differs from the width {hidden}")
    if not cfg.get("caption_channels"):
        problems.append("caption_channels is not set (a PixArt without a caption projection)")
    micro = cfg.get("use_additional_conditions")
    if micro is None:
        micro = cfg.get("sample_size") == 128  # diffusers' own default
    if micro and hidden % 3:
        problems.append(f"size micro-conditions need a width divisible by 3 (got {hidden})")
    if problems:
        raise IncompatibleModel("this PixArt transformer does not map onto mmDiT: " + "; ".join(problems))
    interp = cfg.get("interpolation_scale") or max(cfg["sample_size"] // 64, 1)
    return MMDiTConfig(
        input_size=cfg["sample_size"],
        patch_size=cfg["patch_size"],
        in_channels=cfg["in_channels"],
        out_channels=cfg.get("out_channels") or cfg["in_channels"],
        hidden_size=hidden,
        depth=cfg["num_layers"],
        num_heads=heads,
        caption_channels=cfg["caption_channels"],
        qk_norm=False,
        interpolation_scale=float(interp),
        micro_conditions=bool(micro),
        micro_embedder="pixart" if micro else None,
        pixels_per_latent=8,
    )


def to_diffusers(model) -> "torch.nn.Module":
    """An mmDiT (PixArt-α preset) -> a ``PixArtTransformer2DModel`` with the same weights."""
    from diffusers import PixArtTransformer2DModel

    target = PixArtTransformer2DModel(**diffusers_config(model.config))
    state = _rename(model.state_dict(), _RULES)
    missing, unexpected = target.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "pos_embed.pos_embed"]  # a buffer diffusers computes itself
    if missing or unexpected:
        raise IncompatibleModel(f"export left parameters unmapped: missing {missing}, unexpected {unexpected}")
    return target


def from_diffusers(pixart, subfolder: str | None = None, **config_changes) -> "torch.nn.Module":
    """A ``PixArtTransformer2DModel`` (instance, or a folder / hub id to load; ``subfolder``: "transformer"
    for a pipeline's root) -> our mmDiT. ``config_changes``: config fields that are not weights (say
    ``pixels_per_latent``, which diffusers' config does not record)."""
    from dataclasses import replace

    from models.mmdit import MMDiT

    if not isinstance(pixart, torch.nn.Module):
        pixart = load_transformer(str(pixart), subfolder)
    model = MMDiT(replace(mmdit_config_from_diffusers(pixart.config), **config_changes))
    state = {k: v for k, v in pixart.state_dict().items() if k != "pos_embed.pos_embed"}
    model.load_state_dict(_rename(state, _INVERSE), strict=True)
    return model


def load_transformer(source: str, subfolder: str | None = None):
    """A diffusers PixArt transformer from a folder or hub id. A pipeline root (it has model_index.json)
    without ``subfolder`` reads its ``transformer`` folder."""
    from pathlib import Path

    from diffusers import PixArtTransformer2DModel

    if subfolder is None and (Path(source) / "model_index.json").is_file():
        subfolder = "transformer"
    try:
        return PixArtTransformer2DModel.from_pretrained(source, subfolder=subfolder)
    except (OSError, ValueError, EnvironmentError) as e:
        where = f"{source}" + (f" (subfolder {subfolder})" if subfolder else "")
        raise IncompatibleModel(f"could not load a diffusers PixArt transformer from {where}: {e}. Expected a folder with "
                                "config.json and diffusion_pytorch_model.safetensors, a pipeline root (its transformer/ is "
                                "read), or a hub id with --subfolder transformer") from e


def flow_scheduler(shift: float = 1.0):
    """diffusers' ``FlowMatchEulerDiscreteScheduler`` made usable by ``PixArtAlphaPipeline``.

    The pipeline was written for DDPM-style schedulers: it multiplies the initial latents by
    ``scheduler.init_noise_sigma`` and calls ``scheduler.scale_model_input``, which the flow
    scheduler lacks. Rectified flow starts from unit noise and feeds x_t to the model as is,
    so these are 1.0 and the identity. Pass our sampler's grid as ``sigmas=`` to reproduce
    it step for step (``flow.sampling.time_grid(steps, shift)[:-1]``) with ``shift=1`` here.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler

    class PixArtFlowMatchScheduler(FlowMatchEulerDiscreteScheduler):
        init_noise_sigma = 1.0

        def scale_model_input(self, sample, timestep=None):
            return sample

    return PixArtFlowMatchScheduler(shift=shift)
