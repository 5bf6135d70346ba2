"""ccDiT: the class-conditional diffusion transformer of stage 1.

DiT (Peebles & Xie) with adaLN-Zero blocks, a label embedder with a null class
for classifier-free guidance, QK-norm, and a fixed 2-D sin-cos position
embedding with PixArt-style base-size interpolation. Modulation and output
layers start at zero, so a fresh model predicts exactly zero velocity.

Read top to bottom: config -> block -> final layer -> model.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

from models.layers import (
    DiTBlockLayers,
    DiTConfig,
    LabelEmbedder,
    PatchEmbed,
    TimestepEmbedder,
    basic_init,
    modulate,
    run_block,
    sincos_2d,
    unpatchify,
)
from models.routing import RoutedSpan, Routing


@dataclass
class CCDiTConfig(DiTConfig):
    """A ccDiT: the shared DiT shape (models/layers.py ``DiTConfig``) plus

    num_classes (`int`): real classes; id ``num_classes`` is the null class.
    """

    num_classes: int = 1000


class CCDiTBlock(DiTBlockLayers):
    """adaLN-Zero block: x += gate * f(modulate(norm(x))) for f in (attention, MLP)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, qk_norm: bool):
        super().__init__(hidden_size, num_heads, mlp_ratio, qk_norm)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = torch.addcmul(x, gate_msa.unsqueeze(1), self.attn(modulate(self.norm1(x), shift_msa, scale_msa)))  # x + gate * f: (N, T, D)
        x = torch.addcmul(x, gate_mlp.unsqueeze(1), self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp)))
        return x


class FinalLayer(nn.Module):
    """(N, T, D) -> (N, T, p*p*C): adaLN then a linear projection, both zero-initialized."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class CCDiT(nn.Module):
    """Class-conditional DiT predicting the flow velocity v = noise - x0.

    forward(hidden_states (N, C, H, W), timestep (N,) in [0, 1], class_labels (N,)) -> (N, C, H, W)
    """

    family = "ccdit"
    # Left alone by the precision converter (models/linear.py convert): embedders and the output projection.
    _keep_in_high_precision = ("x_embedder", "t_embedder", "y_embedder", "final_layer")

    def __init__(self, config: CCDiTConfig):
        super().__init__()
        self.config = config
        c = config
        self.out_channels = c.in_channels
        self.x_embedder = PatchEmbed(c.patch_size, c.in_channels, c.hidden_size)
        self.t_embedder = TimestepEmbedder(c.hidden_size)
        self.y_embedder = LabelEmbedder(c.num_classes, c.hidden_size)
        base = c.base_size if c.base_size is not None else c.grid_size
        self.register_buffer(
            "pos_embed", sincos_2d(c.hidden_size, c.grid_size, c.grid_size, base, c.interpolation_scale)[None], persistent=False
        )
        self.blocks = nn.ModuleList(
            CCDiTBlock(c.hidden_size, c.num_heads, c.mlp_ratio, c.qk_norm) for _ in range(c.depth)
        )
        self.final_layer = FinalLayer(c.hidden_size, c.patch_size, self.out_channels)
        self._grid_pos: dict[tuple[int, int], torch.Tensor] = {}  # the positions of smaller training grids (train.lowres)
        self.gradient_checkpointing = False  # set by the trainer (train.activation_checkpointing)
        self.routing: Routing | None = None  # set by the trainer (train.routing); used only with route_scores, in training
        self.initialize_weights()

    @property
    def null_class(self) -> int:
        return self.config.num_classes

    def initialize_weights(self) -> None:
        basic_init(self)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.linear_1.weight, std=0.02)
        nn.init.normal_(self.t_embedder.linear_2.weight, std=0.02)
        for block in self.blocks:  # adaLN-Zero: every residual branch starts closed
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def condition(self, timestep: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        """The adaLN conditioning vector c = t_emb + y_emb, (N, D)."""
        return self.t_embedder(timestep) + self.y_embedder(class_labels)

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor,
                route_scores: torch.Tensor | None = None) -> torch.Tensor:
        """``route_scores`` (N, T): in training with ``self.routing`` set, the tokens of the lowest
        scores go through the routed span and the others skip it (models/routing.py); with
        ``routing.mask`` the others are dropped and the output is zero there."""
        n, _, h, w = hidden_states.shape
        p = self.config.patch_size
        pos = self.pos_embed
        if h != self.config.input_size or w != self.config.input_size:
            # training may see a smaller grid (train.lowres's warm-up); samples are always at the built size
            if not self.training or h > self.config.input_size or w > self.config.input_size or h % p or w % p:
                raise ValueError(f"ccDiT was built for {self.config.input_size}x{self.config.input_size} latents, got {h}x{w} "
                                 "(a smaller grid of whole patches only in training, train.lowres's warm-up)")
            pos = self._grid_pos.get((h // p, w // p))
            if pos is None or pos.device != self.pos_embed.device or pos.dtype != self.pos_embed.dtype:
                cfg = self.config  # built once per grid (on the host), kept beside the built size's buffer
                pos = sincos_2d(cfg.hidden_size, h // p, w // p, cfg.base_size if cfg.base_size is not None else cfg.grid_size,
                                cfg.interpolation_scale)[None].to(self.pos_embed)
                self._grid_pos[(h // p, w // p)] = pos
        # position first: the sum takes its contiguous (N, T, D) layout, not the patch embedding's transposed one,
        # so no norm or linear downstream copies the residual stream
        x = pos + self.x_embedder(hidden_states)  # (N, T, D), T = H * W / p**2
        c = self.condition(timestep, class_labels)  # (N, D)
        span = RoutedSpan(self.routing, route_scores, x.shape[1], self.training)
        for i, block in enumerate(self.blocks):
            x = run_block(block, self.gradient_checkpointing, span.enter(i, x), c)  # (N, T, D); (N, K, D) in the span
        x = span.output(self.final_layer(span.leave(x), c))  # (N, T, p * p * C); masked: zero at the dropped tokens
        return unpatchify(x, p, self.out_channels, h // p, w // p)  # (N, C, H, W)

    def export_config(self) -> dict:
        return asdict(self.config)
