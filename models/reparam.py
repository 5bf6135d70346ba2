"""Carry weights across curriculum stages, preserving the function where the math allows.

1 -> 2 (ccDiT -> mmDiT), the PixArt way:
- copy every weight the two models share (patch embedding, attention, QK-norms, MLPs,
  final projection, timestep MLP);
- fold the null class into the timestep embedder's last bias, so mmDiT's timestep
  embedding equals ccDiT's conditioning vector c = t_emb + y_null;
- fold the per-block adaLN MLPs into adaLN-single: the shared MLP gets their mean,
  each block's table holds its own MLP's difference evaluated at a reference time
  t_ref, and the final layer's table likewise;
- new parts: the caption projection (fresh) and the cross-attention, whose output
  projection is zero, so text cannot change anything yet.
Then, for any text, mmDiT(x, t_ref) == ccDiT(x, t_ref, null class) exactly; at
other t the blocks differ by (W_i - W_mean)(SiLU(c(t)) - SiLU(c(t_ref))).

2 -> 3 -> 4 -> 5 (``mmdit_transition``) keep the architecture and copy every tensor:
2->3 enlarges the latent grid (position embedding regenerated over the old range, the
timestep shift raised by SD3's rule), 3->4 adds zero-initialized micro-conditions
(function-preserving at every size), 4->5 changes nothing in the model.
"""
from __future__ import annotations

import math
from dataclasses import asdict

import torch
import torch.nn.functional as F

from models.ccdit import CCDiT
from models.mmdit import MMDiT, MMDiTConfig


@torch.no_grad()
def ccdit_to_mmdit(src: CCDiT, caption_channels: int, t_ref: float = 0.5, seed: int = 0,
                   pixels_per_latent: int = 8) -> tuple[MMDiT, dict]:
    """Build the stage-2 mmDiT from a stage-1 ccDiT. Returns (model, report)."""
    c = src.config
    torch.manual_seed(seed)  # the fresh parts (caption projection, cross-attention inputs)
    dst = MMDiT(
        MMDiTConfig(
            input_size=c.input_size, patch_size=c.patch_size, in_channels=c.in_channels, hidden_size=c.hidden_size,
            depth=c.depth, num_heads=c.num_heads, mlp_ratio=c.mlp_ratio, caption_channels=caption_channels,
            qk_norm=c.qk_norm, base_size=c.base_size, interpolation_scale=c.interpolation_scale,
            pixels_per_latent=pixels_per_latent,
        )
    )
    s, d = src.state_dict(), dst.state_dict()
    report: dict = {"copied": [], "folded": {}, "new": []}

    def copy(src_name: str, dst_name: str) -> None:
        d[dst_name].copy_(s[src_name])
        report["copied"].append(dst_name)

    for name in s:
        if name.startswith(("x_embedder.", "t_embedder.")) or (name.startswith("blocks.") and ".adaLN_modulation." not in name):
            copy(name, name)
    copy("final_layer.linear.weight", "final_layer.linear.weight")
    copy("final_layer.linear.bias", "final_layer.linear.bias")

    # mmDiT's timestep embedding := ccDiT's c for the null class
    null = s["y_embedder.embedding_table.weight"][src.null_class]
    d["t_embedder.linear_2.bias"].add_(null)
    report["folded"]["t_embedder.linear_2.bias"] = "copied + the null-class embedding"

    # adaLN-Zero MLPs -> adaLN-single: shared mean + per-block table at t_ref
    c_ref = src.condition(torch.tensor([t_ref]), torch.tensor([src.null_class]))[0]  # (D,)
    s_ref = F.silu(c_ref)
    ws = torch.stack([s[f"blocks.{i}.adaLN_modulation.1.weight"] for i in range(c.depth)])  # (depth, 6D, D)
    bs = torch.stack([s[f"blocks.{i}.adaLN_modulation.1.bias"] for i in range(c.depth)])  # (depth, 6D)
    w_mean, b_mean = ws.mean(0), bs.mean(0)
    d["t_block.1.weight"].copy_(w_mean)
    d["t_block.1.bias"].copy_(b_mean)
    report["folded"]["t_block.1.weight"] = report["folded"]["t_block.1.bias"] = "mean of the blocks' adaLN MLPs"
    for i in range(c.depth):
        table = (ws[i] - w_mean) @ s_ref + (bs[i] - b_mean)  # (6D,)
        d[f"blocks.{i}.scale_shift_table"].copy_(table.view(6, -1))
        report["folded"][f"blocks.{i}.scale_shift_table"] = f"block adaLN MLP minus the mean, at t_ref={t_ref}"
    mod_ref = s["final_layer.adaLN_modulation.1.weight"] @ s_ref + s["final_layer.adaLN_modulation.1.bias"]  # (2D,)
    d["final_layer.scale_shift_table"].copy_(mod_ref.view(2, -1) - c_ref[None])
    report["folded"]["final_layer.scale_shift_table"] = f"final adaLN at t_ref={t_ref} minus c(t_ref)"

    for i in range(c.depth):
        d[f"blocks.{i}.cross_attn.to_out.weight"].zero_()
        d[f"blocks.{i}.cross_attn.to_out.bias"].zero_()
    touched = set(report["copied"]) | set(report["folded"])
    report["new"] = sorted(k for k in d if k not in touched)
    dst.load_state_dict(d)
    report["t_ref"] = t_ref
    report["dropped"] = sorted(k for k in s if "adaLN_modulation" in k or k.startswith("y_embedder."))
    return dst, report


def mmdit_config_dict(model: MMDiT) -> dict:
    return asdict(model.config)


# ---------------------------------------------------------------- mmDiT -> mmDiT (stages 2 -> 3 -> 4 -> 5)
def sd3_shift(shift: float, old_pixels: int, new_pixels: int) -> float:
    """SD3's resolution-dependent timestep shift: alpha scales with sqrt(pixels / base pixels)."""
    return shift * math.sqrt(new_pixels / old_pixels)


@torch.no_grad()
def mmdit_transition(src: MMDiT, transition: str, input_size: int | None = None,
                     pos_grid: str = "stretch") -> tuple[MMDiT, dict]:
    """2to3: a larger latent grid (``input_size``); the position embedding is regenerated so the new
    grid spans the old one's range (base_size = the old grid). 3to4: PixArt-MS micro-conditions,
    zero-initialized, and the position grid for non-square buckets (``pos_grid``, one of
    models.mmdit.POS_GRIDS, explained at MMDiTConfig). The function is unchanged on square grids,
    and at every size with an unchanged pos_grid.
    4to5: same model. Every tensor of the source is copied. Returns (model, report)."""
    c = asdict(src.config)
    changed: dict = {}
    if transition == "2to3":
        if not input_size or input_size <= src.config.input_size:
            raise ValueError(f"2to3 needs a larger latent grid than {src.config.input_size} (got input_size={input_size})")
        if input_size % src.config.patch_size:
            raise ValueError(f"input_size {input_size} is not divisible by the patch size {src.config.patch_size}")
        changed = {"input_size": input_size, "base_size": src.base_size}
    elif transition == "3to4":
        changed = {"micro_conditions": True, "pos_grid": pos_grid}
    elif transition != "4to5":
        raise ValueError(f"unknown mmDiT transition {transition!r}; expected 2to3, 3to4 or 4to5")
    dst = MMDiT(MMDiTConfig(**{**c, **changed}))
    s, d = src.state_dict(), dst.state_dict()
    for k in s:
        d[k].copy_(s[k])
    dst.load_state_dict(d)
    report = {"copied": sorted(s), "new": sorted(set(d) - set(s)), "folded": {},
              "config_changes": {k: [c.get(k), v] for k, v in changed.items() if c.get(k) != v}}
    return dst, report
