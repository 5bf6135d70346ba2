"""mmDiT: the text-conditioned diffusion transformer of stages 2-5.

The default block is PixArt-α's: adaLN-single (one shared timestep MLP producing
6·D, plus a learned per-block table), self-attention -> cross-attention to the
text tokens -> MLP. With QK-norm off and GELU-tanh MLPs the parameters map
one-to-one onto diffusers' ``PixArtTransformer2DModel`` (models/diffusers_pixart.py).
``block="joint"`` swaps in SD3's MM-DiT block instead: separate weights for the
image and text streams, one attention over both token sets.

Read top to bottom: config -> block -> final layer -> model.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.layers import (
    MLP,
    Attention,
    DiTBlockLayers,
    DiTConfig,
    PatchEmbed,
    TimestepEmbedder,
    attention,
    basic_init,
    gelu_tanh,
    heads_dtype,
    modulate,
    run_block,
    sincos_2d,
    timestep_sinusoid,
    unpatchify,
)
from models.routing import RoutedSpan, Routing


POS_GRIDS = ("stretch", "isotropic", "shortside")  # MMDiTConfig.pos_grid
MICRO_EMBEDDERS = ("pixart", "mlp")  # MMDiTConfig.micro_embedder


@dataclass
class MMDiTConfig(DiTConfig):
    """An mmDiT: the shared DiT shape (models/layers.py ``DiTConfig``; QK-norm off for diffusers
    compatibility) plus

    out_channels (`int` or None): predicted channels; None = in_channels.
    caption_channels (`int`): width of the text encoder's hidden states.
    block (`str`): "pixart" (adaLN-single + cross-attention) or "joint" (SD3: one attention
        over image and text tokens, separate weights per stream).
    micro_conditions (`bool`): PixArt-MS size and aspect-ratio conditions (stage 4 on), added to
        the timestep embedding through a zero-initialized output, so switching them on
        changes nothing until training does.
    micro_embedder (`str` or None): how they are embedded. "pixart" is PixArt-MS's and diffusers'
        layout (a resolution MLP applied to height and width, an aspect-ratio MLP, each to D/3,
        concatenated), so stage-4/5 models import from and export to diffusers; it needs
        hidden_size divisible by 3. "mlp" is one MLP over the three sinusoids (checkpoints saved
        before "pixart" existed, and widths not divisible by 3). None picks "pixart" when it can.
    pixels_per_latent (`int`): the autoencoder's downsampling; micro-conditions are in pixels.
    control_blocks (`int`): ControlNet-Transformer (PixArt-δ): trainable copies of the first N blocks
        (``controlnet``, see :class:`ControlNet`) read a control image's latents; 0 = none. PixArt-δ
        copies 13 of 28.
    guidance_embed (`bool`): a guidance-scale input (a distilled few-step student, flow/consistency.py):
        the scale w is embedded like a timestep (w x 1000) and added to the timestep embedding through
        a zero-initialized output, so the student starts as its teacher.
    pos_grid (`str`): how non-square grids place their positions: "stretch" (PixArt, diffusers:
        each axis spans the base range) or "isotropic" (one step for both axes, so a circle is a
        circle in position space at every aspect ratio, but the long axis leaves the trained
        range at its far end) or "shortside" (one step for both axes, the short side spanning the
        base range, centred on the square grid's centre: sizes relative to the short side come
        out as on the square grid; the long axis runs past the range at both ends). All three
        are the same on square grids. 3to4 picks it (default stretch).
    """

    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    out_channels: int | None = None
    caption_channels: int = 4096
    block: str = "pixart"
    micro_conditions: bool = False
    micro_embedder: str | None = None
    pixels_per_latent: int = 8
    pos_grid: str = "stretch"
    control_blocks: int = 0
    guidance_embed: bool = False

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.control_blocks <= self.depth:
            raise ValueError(f"control_blocks={self.control_blocks}: copies of the first N blocks, 0 <= N <= depth ({self.depth})")
        if self.pos_grid not in POS_GRIDS:
            raise ValueError(f"pos_grid={self.pos_grid!r}: expected one of {POS_GRIDS} ('stretch' is PixArt's)")
        if self.micro_embedder is None:
            self.micro_embedder = "pixart" if self.hidden_size % 3 == 0 else "mlp"
        if self.micro_embedder not in MICRO_EMBEDDERS:
            raise ValueError(f"micro_embedder={self.micro_embedder!r}: expected one of {MICRO_EMBEDDERS}")
        if self.micro_conditions and self.micro_embedder == "pixart" and self.hidden_size % 3:
            raise ValueError(f"micro_embedder='pixart' splits the width in thirds, but hidden_size={self.hidden_size} "
                             "is not divisible by 3: use micro_embedder='mlp' or a width divisible by 3")


class PixArtBlock(DiTBlockLayers):
    """adaLN-single block: modulation = shared t-MLP output + this block's table (6, D)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, qk_norm: bool):
        super().__init__(hidden_size, num_heads, mlp_ratio, qk_norm)
        self.cross_attn = Attention(hidden_size, num_heads, qk_norm=qk_norm, context_dim=hidden_size)
        self.scale_shift_table = nn.Parameter(torch.randn(6, hidden_size) / hidden_size**0.5)

    def forward(self, x: torch.Tensor, t_modulation: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None,
                kv: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        n = x.shape[0]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            self.scale_shift_table[None] + t_modulation.reshape(n, 6, -1)
        ).chunk(6, dim=1)  # each (N, 1, D)
        x = torch.addcmul(x, gate_msa, self.attn(modulate(self.norm1(x), shift_msa, scale_msa)))  # x + gate * f: (N, T, D)
        x = x + self.cross_attn(x, context, mask, kv=kv)  # PixArt: cross-attention on the un-normalized stream
        return torch.addcmul(x, gate_mlp, self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp)))


class JointBlock(DiTBlockLayers):
    """SD3's MM-DiT block: image and text streams with their own weights (adaLN from the
    timestep, attention projections, MLP), one attention over the concatenated tokens.
    The image stream uses the shared names (norm1/attn/norm2/mlp); the text stream's are
    ``context_*``. The last block only feeds text into attention (``context_pre_only``),
    so every parameter gets a gradient (DDP requires it)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, qk_norm: bool, context_pre_only: bool = False):
        super().__init__(hidden_size, num_heads, mlp_ratio, qk_norm)
        self.context_pre_only = context_pre_only
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))
        self.context_adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, (2 if context_pre_only else 6) * hidden_size))
        self.context_norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.context_attn = Attention(hidden_size, num_heads, qk_norm=qk_norm)
        if context_pre_only:  # text is only attended to: no text queries, outputs or MLP
            del self.context_attn.to_q, self.context_attn.norm_q, self.context_attn.to_out
        else:
            self.context_norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
            self.context_mlp = MLP(hidden_size, mlp_ratio)

    def _heads(self, attn: Attention, x: torch.Tensor, queries: bool = True):
        n, t, _ = x.shape
        split = lambda y: heads_dtype(y).view(n, t, attn.num_heads, attn.head_dim).transpose(1, 2)  # noqa: E731  (N, h, T, hd)
        q = attn.norm_q(split(attn.to_q(x))) if queries else None
        return q, attn.norm_k(split(attn.to_k(x))), split(attn.to_v(x))

    def forward(self, x: torch.Tensor, context: torch.Tensor, t_emb: torch.Tensor, mask: torch.Tensor | None):
        n, t, d = x.shape
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(t_emb)[:, None].chunk(6, dim=-1)
        c_mod = self.context_adaLN_modulation(t_emb)[:, None].chunk(2 if self.context_pre_only else 6, dim=-1)
        qx, kx, vx = self._heads(self.attn, modulate(self.norm1(x), shift_msa, scale_msa))
        qc, kc, vc = self._heads(self.context_attn, modulate(self.context_norm1(context), c_mod[0], c_mod[1]),
                                 queries=not self.context_pre_only)
        q = qx if self.context_pre_only else torch.cat([qc, qx], dim=2)  # text tokens first
        k, v = torch.cat([kc, kx], dim=2), torch.cat([vc, vx], dim=2)
        attn_mask = None
        if mask is not None:  # padded text keys are ignored; image keys always count
            attn_mask = torch.cat([mask, torch.ones(n, t, dtype=torch.bool, device=mask.device)], dim=1)[:, None, None, :]
        out = attention(q, k, v, attn_mask=attn_mask).transpose(1, 2)
        out = out.reshape(n, q.shape[2], d)
        out_c, out_x = out[:, : q.shape[2] - t], out[:, q.shape[2] - t :]
        x = torch.addcmul(x, gate_msa, self.attn.to_out(out_x))  # x + gate * f
        x = torch.addcmul(x, gate_mlp, self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp)))
        if self.context_pre_only:
            return x, context
        _, _, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = c_mod
        context = torch.addcmul(context, c_gate_msa, self.context_attn.to_out(out_c))
        context = torch.addcmul(context, c_gate_mlp, self.context_mlp(modulate(self.context_norm2(context), c_shift_mlp, c_scale_mlp)))
        return x, context


class PixArtFinalLayer(nn.Module):
    """(N, T, D) -> (N, T, p*p*C): shift/scale = table (2, D) + the timestep embedding."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.scale_shift_table = nn.Parameter(torch.randn(2, hidden_size) / hidden_size**0.5)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)

    def forward(self, x: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
        shift, scale = (self.scale_shift_table[None] + t_emb[:, None]).chunk(2, dim=1)  # (N, 1, D) each
        return self.linear(modulate(self.norm_final(x), shift, scale))


class MicroConditionEmbedder(nn.Module):
    """Image height, width (pixels) and aspect ratio h/w -> (N, D) added to the timestep embedding
    (PixArt-MS): one MLP over the three sinusoids, zero-initialized output (``micro_embedder="mlp"``)."""

    def __init__(self, hidden_size: int, frequency_size: int = 256):
        super().__init__()
        self.frequency_size = frequency_size
        self.linear_1 = nn.Linear(3 * frequency_size, hidden_size)
        self.linear_2 = nn.Linear(hidden_size, hidden_size)

    def forward(self, resolution: torch.Tensor, aspect_ratio: torch.Tensor) -> torch.Tensor:
        values = torch.cat([resolution.float(), aspect_ratio.float().reshape(-1, 1)], dim=1)  # (N, 3)
        freq = timestep_sinusoid(values.reshape(-1), self.frequency_size).reshape(values.shape[0], -1)
        return self.linear_2(F.silu(self.linear_1(freq.to(self.linear_1.weight.dtype))))


class PixArtMicroConditionEmbedder(nn.Module):
    """PixArt-MS's micro-conditions (``micro_embedder="pixart"``), parameter for parameter diffusers'
    ``PixArtAlphaCombinedTimestepSizeEmbeddings``: height and width each go through the resolution
    MLP, the aspect ratio through its own, each to D/3; the three are concatenated
    [height, width, aspect] to (N, D). Both output layers start at zero."""

    def __init__(self, hidden_size: int, frequency_size: int = 256):
        super().__init__()
        self.frequency_size = frequency_size
        self.resolution_embedder = TimestepEmbedder(hidden_size // 3, frequency_size, time_scale=1.0)
        self.aspect_ratio_embedder = TimestepEmbedder(hidden_size // 3, frequency_size, time_scale=1.0)

    def forward(self, resolution: torch.Tensor, aspect_ratio: torch.Tensor) -> torch.Tensor:
        n = resolution.shape[0]
        size = self.resolution_embedder(resolution.reshape(-1).float()).reshape(n, -1)  # (N, 2 D/3)
        aspect = self.aspect_ratio_embedder(aspect_ratio.reshape(-1).float()).reshape(n, -1)  # (N, D/3)
        return torch.cat([size, aspect], dim=1)


class CaptionProjection(nn.Module):
    """Text encoder width -> D: Linear, GELU-tanh, Linear (PixArt's caption projection)."""

    def __init__(self, in_features: int, hidden_size: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_features, hidden_size)
        self.linear_2 = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(gelu_tanh(self.linear_1(x)))


class ControlNet(nn.Module):
    """PixArt-δ's ControlNet-Transformer: the control image's latents, patch-embedded by the base's own
    (frozen) embedder and a zero-initialized ``before_proj``, are added to the base's input tokens
    and run through trainable copies of the base's first N blocks, one after the other; copy i's
    output goes through its zero-initialized ``after_proj[i]`` and is added to base block i's output,
    times the conditioning scale. Both projections start at zero, so a fresh ControlNet leaves the
    base's output exactly as it was; ``copy_from`` makes the copies equal to the base's blocks."""

    def __init__(self, blocks: list[nn.Module], hidden_size: int):
        super().__init__()
        self.before_proj = nn.Linear(hidden_size, hidden_size)
        self.blocks = nn.ModuleList(blocks)
        self.after_proj = nn.ModuleList(nn.Linear(hidden_size, hidden_size) for _ in blocks)
        self.zero_projections()

    def zero_projections(self) -> None:
        for proj in (self.before_proj, *self.after_proj):
            nn.init.zeros_(proj.weight)
            nn.init.zeros_(proj.bias)

    @torch.no_grad()
    def copy_from(self, base_blocks: nn.ModuleList) -> None:
        """Each copy takes the weights of the base block it shadows (PixArt-δ starts them so)."""
        for twin, block in zip(self.blocks, base_blocks):
            twin.load_state_dict(block.state_dict())


@dataclass
class TextCache:
    """A text condition's share of the forward pass, which does not depend on the image or the
    timestep: sampling computes it once (``MMDiT.cache_text``) instead of at every step.

    context: projected caption tokens (N, L, D); mask: (N, L) bool key mask, None when nothing is
    padded; kv: PixArt blocks' cross-attention keys and values, one (k, v) per block, each
    (N, heads, L, head_dim); None for joint blocks (their text stream changes with the timestep).
    """

    context: torch.Tensor
    mask: torch.Tensor | None
    kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None


class MMDiT(nn.Module):
    """Text-conditioned DiT predicting the flow velocity v = noise - x0.

    forward(hidden_states (N, C, H, W), timestep (N,) in [0, 1],
            encoder_hidden_states (N, L, caption_channels), encoder_attention_mask (N, L) bool or None)
        -> (N, C_out, H, W)
    """

    family = "mmdit"
    _keep_in_high_precision = ("x_embedder", "t_embedder", "t_block", "y_embedder", "micro_embedder", "guidance_embedder",
                               "final_layer")

    def __init__(self, config: MMDiTConfig):
        super().__init__()
        self.config = c = config
        self.out_channels = c.out_channels or c.in_channels
        self.x_embedder = PatchEmbed(c.patch_size, c.in_channels, c.hidden_size)
        self.t_embedder = TimestepEmbedder(c.hidden_size)
        self.y_embedder = CaptionProjection(c.caption_channels, c.hidden_size)
        if c.guidance_embed:
            self.guidance_embedder = TimestepEmbedder(c.hidden_size)
        if c.micro_conditions:
            embedder = PixArtMicroConditionEmbedder if c.micro_embedder == "pixart" else MicroConditionEmbedder
            self.micro_embedder = embedder(c.hidden_size)
        if c.block == "pixart":
            self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(c.hidden_size, 6 * c.hidden_size))  # adaLN-single
            self.blocks = nn.ModuleList(
                PixArtBlock(c.hidden_size, c.num_heads, c.mlp_ratio, c.qk_norm) for _ in range(c.depth)
            )
        elif c.block == "joint":
            self.blocks = nn.ModuleList(
                JointBlock(c.hidden_size, c.num_heads, c.mlp_ratio, c.qk_norm, context_pre_only=i == c.depth - 1)
                for i in range(c.depth)
            )
        else:
            raise ValueError(f"unknown mmDiT block {c.block!r}; expected 'pixart' or 'joint'")
        self.final_layer = PixArtFinalLayer(c.hidden_size, c.patch_size, self.out_channels)
        self.gradient_checkpointing = False  # set by the trainer (train.activation_checkpointing)
        self.routing: Routing | None = None  # set by the trainer (train.routing); used only with route_scores, in training
        if c.control_blocks:
            self.controlnet = ControlNet([copy.deepcopy(b) for b in self.blocks[: c.control_blocks]], c.hidden_size)
        self.initialize_weights()

    @property
    def base_size(self) -> int:
        return self.config.base_size if self.config.base_size is not None else self.config.grid_size

    def pos_embed(self, grid_h: int, grid_w: int, device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(1, grid_h * grid_w, D): any grid, interpolated to this model's base size."""
        return sincos_2d(self.config.hidden_size, grid_h, grid_w, self.base_size, self.config.interpolation_scale,
                         isotropic=self.config.pos_grid == "isotropic",
                         short_side=self.config.pos_grid == "shortside").to(device=device, dtype=dtype)[None]

    def initialize_weights(self) -> None:
        basic_init(self)
        nn.init.normal_(self.t_embedder.linear_1.weight, std=0.02)
        nn.init.normal_(self.t_embedder.linear_2.weight, std=0.02)
        if self.config.block == "pixart":
            nn.init.normal_(self.t_block[1].weight, std=0.02)
        nn.init.normal_(self.y_embedder.linear_1.weight, std=0.02)
        nn.init.normal_(self.y_embedder.linear_2.weight, std=0.02)
        for block in self.blocks:
            if isinstance(block, PixArtBlock):  # text enters through a closed gate: a fresh block ignores it
                nn.init.zeros_(block.cross_attn.to_out.weight)
                nn.init.zeros_(block.cross_attn.to_out.bias)
            else:  # joint: adaLN-Zero, every residual branch starts closed
                for mod in (block.adaLN_modulation[1], block.context_adaLN_modulation[1]):
                    nn.init.zeros_(mod.weight)
                    nn.init.zeros_(mod.bias)
        if self.config.micro_conditions:  # closed until trained: adding them preserves the function
            outputs = [self.micro_embedder.linear_2] if self.config.micro_embedder == "mlp" else [
                self.micro_embedder.resolution_embedder.linear_2, self.micro_embedder.aspect_ratio_embedder.linear_2]
            for out in outputs:
                nn.init.zeros_(out.weight)
                nn.init.zeros_(out.bias)
        nn.init.zeros_(self.final_layer.linear.weight)  # a fresh model outputs exactly zero
        nn.init.zeros_(self.final_layer.linear.bias)
        if self.config.guidance_embed:  # closed: a student starts as its teacher
            nn.init.zeros_(self.guidance_embedder.linear_2.weight)
            nn.init.zeros_(self.guidance_embedder.linear_2.bias)
        if self.config.control_blocks:  # the copies as the base's blocks, the projections closed
            self.controlnet.copy_from(self.blocks)
            self.controlnet.zero_projections()

    def _text(self, encoder_hidden_states: torch.Tensor, encoder_attention_mask: torch.Tensor | None):
        context = self.y_embedder(encoder_hidden_states)  # (N, L, D)
        mask = None
        # only pay for masking when something is padded; compiled, keep the mask (same result), as
        # that data-dependent test would break the graph
        if encoder_attention_mask is not None and (torch.compiler.is_compiling() or not bool(encoder_attention_mask.all())):
            mask = encoder_attention_mask.bool()
        return context, mask

    @torch.no_grad()
    def cache_text(self, encoder_hidden_states: torch.Tensor, encoder_attention_mask: torch.Tensor | None = None) -> TextCache:
        """The text's step-independent work, done once for a whole sampling run: pass the result as
        ``forward(..., text_cache=...)``. Key positions padded in every row are dropped first (they
        get zero attention weight anyway), so a long padded encoder output costs only its longest prompt."""
        if encoder_attention_mask is not None and bool(encoder_attention_mask.any()):
            last = int(encoder_attention_mask.bool().any(0).nonzero().max()) + 1
            encoder_hidden_states, encoder_attention_mask = encoder_hidden_states[:, :last], encoder_attention_mask[:, :last]
        context, mask = self._text(encoder_hidden_states, encoder_attention_mask)
        kv = [block.cross_attn.keys_values(context) for block in self.blocks] if self.config.block == "pixart" else None
        return TextCache(context, mask, kv)

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        resolution: torch.Tensor | None = None,
        aspect_ratio: torch.Tensor | None = None,
        text_cache: TextCache | None = None,
        control: torch.Tensor | None = None,
        control_scale: float = 1.0,
        guidance: torch.Tensor | None = None,
        route_scores: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``text_cache`` (from ``cache_text``) stands in for encoder_hidden_states and its mask.
        ``control`` (N, C, H, W): a control image's normalized latents, for a model with a ControlNet
        (``control_blocks``); its residuals are added times ``control_scale`` (0: the base alone).
        ``guidance`` (N,): the guidance scale of a distilled student (``guidance_embed``).
        ``route_scores`` (N, T): in training with ``self.routing`` set, the image tokens of the lowest
        scores go through the routed span and the others skip it (models/routing.py); with
        ``routing.mask`` the others are dropped and the output is zero there."""
        n, _, h, w = hidden_states.shape
        p = self.config.patch_size
        if h % p or w % p:
            raise ValueError(f"latent size {h}x{w} is not divisible by the patch size {p}")
        # position first: the sum is contiguous (N, T, D), so no norm or linear downstream copies the
        # residual stream (the patch embedding alone is a transposed view; diffusers adds in that order)
        pos = self.pos_embed(h // p, w // p, hidden_states.device, self.x_embedder.proj.weight.dtype)  # (1, T, D)
        x = pos + self.x_embedder(hidden_states)  # (N, T, D)
        t_emb = self.t_embedder(timestep)  # (N, D)
        if guidance is not None:
            if not self.config.guidance_embed:
                raise ValueError("a guidance scale was given, but this model takes none (guidance_embed=False)")
            t_emb = t_emb + self.guidance_embedder(guidance.to(t_emb.dtype).expand(n))
        if self.config.micro_conditions:  # default: the size of the image being generated
            if resolution is None:
                px = self.config.pixels_per_latent
                resolution = torch.tensor([[h * px, w * px]], device=hidden_states.device).expand(n, 2)
            if aspect_ratio is None:
                aspect_ratio = resolution[:, 0].float() / resolution[:, 1].float()
            t_emb = t_emb + self.micro_embedder(resolution, aspect_ratio)
        if text_cache is None:
            if encoder_hidden_states is None:
                raise TypeError("MMDiT.forward needs encoder_hidden_states (or a text_cache from cache_text)")
            text_cache = TextCache(*self._text(encoder_hidden_states, encoder_attention_mask))
        elif text_cache.context.shape[0] != n:
            raise ValueError(f"text_cache holds {text_cache.context.shape[0]} conditions for a batch of {n} latents")
        context, mask = text_cache.context, text_cache.mask
        t_modulation = self.t_block(t_emb) if self.config.block == "pixart" else None  # (N, 6D): adaLN-single, shared by every block
        residuals = self._control_residuals(x, pos, control, control_scale, t_emb, t_modulation, context, mask)
        span = RoutedSpan(self.routing, route_scores, x.shape[1], self.training)
        if span.active and residuals:
            raise ValueError("token routing with a ControlNet: the control residuals cover every token; train a ControlNet "
                             "without train.routing")
        if self.config.block == "joint":
            for i, block in enumerate(self.blocks):
                x, context = run_block(block, self.gradient_checkpointing, span.enter(i, x), context, t_emb, mask)  # (N, T or K, D), (N, L, D)
                if i < len(residuals):
                    x = x + residuals[i]
        else:
            kv = text_cache.kv or [None] * len(self.blocks)
            for i, (block, block_kv) in enumerate(zip(self.blocks, kv)):
                x = run_block(block, self.gradient_checkpointing, span.enter(i, x), t_modulation, context, mask, block_kv)  # (N, T or K, D)
                if i < len(residuals):
                    x = x + residuals[i]
        x = span.output(self.final_layer(span.leave(x), t_emb))  # (N, T, p * p * C); masked: zero at the dropped tokens
        return unpatchify(x, p, self.out_channels, h // p, w // p)  # (N, C, H, W)

    def _control_residuals(self, x: torch.Tensor, pos: torch.Tensor, control: torch.Tensor | None, scale: float,
                           t_emb: torch.Tensor, t_modulation: torch.Tensor | None, context: torch.Tensor,
                           mask: torch.Tensor | None) -> list[torch.Tensor]:
        """The ControlNet's additions to the first N blocks' outputs, [(N, T, D)] * N; none without a control.
        ``pos``: the position embedding of the image tokens, which the control's tokens share."""
        if control is None:
            return []
        if not self.config.control_blocks:
            raise ValueError("a control image was given, but this model has no ControlNet (control_blocks=0)")
        embedded = self.x_embedder(control)  # (N, T', D)
        if embedded.shape[:2] != x.shape[:2]:
            raise ValueError(f"control latents {tuple(control.shape)} do not match the {x.shape[0]} images of {x.shape[1]} tokens")
        net = self.controlnet
        c = x + net.before_proj(pos + embedded)  # (N, T, D)
        residuals = []
        c_context = context
        for block, after in zip(net.blocks, net.after_proj):
            if t_modulation is None:
                c, c_context = run_block(block, self.gradient_checkpointing, c, c_context, t_emb, mask)
            else:  # the copies compute their own cross-attention keys and values (a text cache holds the base's)
                c = run_block(block, self.gradient_checkpointing, c, t_modulation, context, mask, None)
            residuals.append(after(c) * scale)
        return residuals

    def export_config(self) -> dict:
        return asdict(self.config)
