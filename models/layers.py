"""Building blocks shared by ccDiT and mmDiT.

Read top to bottom: ``modulate`` -> position embedding -> embedders (patch,
timestep, label) -> attention -> MLP. Shapes: N batch, T tokens, D hidden.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F



def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation: x (N, T, D), shift/scale (N, D) or (N, 1, D)."""
    if shift.dim() == 2:
        shift, scale = shift.unsqueeze(1), scale.unsqueeze(1)
    return torch.addcmul(shift, x, 1 + scale)  # shift + x * (1 + scale), one pass over x


_GELU_2C = 2 * math.sqrt(2 / math.pi)


def gelu_tanh_sigmoid(x: torch.Tensor) -> torch.Tensor:
    """GELU's tanh approximation written as x·σ(2u), u = sqrt(2/π)·(x + 0.044715·x³): the same
    function as 0.5·x·(1 + tanh u), since 0.5·(1 + tanh u) = σ(2u)."""
    return x * torch.sigmoid(_GELU_2C * (x + 0.044715 * (x * x * x)))


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU, tanh approximation (DiT, PixArt). Under ``torch.compile`` it is ``gelu_tanh_sigmoid``
    (fp32 results within 5e-7 of aten's), because Inductor's CPU code for tanh is slow (the σ form
    fuses into about half the time). Eager mode keeps aten's single GELU kernel (the σ form would
    be six passes)."""
    if torch.compiler.is_compiling():
        return gelu_tanh_sigmoid(x)
    return F.gelu(x, approximate="tanh")


def run_block(block: nn.Module, checkpointing: bool, *args) -> torch.Tensor:
    """Call a transformer block, recomputing its activations in backward when ``checkpointing``
    (activation checkpointing: less memory for one extra forward per block)."""
    if checkpointing and torch.is_grad_enabled():
        from torch.utils.checkpoint import checkpoint

        return checkpoint(block, *args, use_reentrant=False)
    return block(*args)


@dataclass
class DiTConfig:
    """What every DiT here shares; the model families' configs extend it. All fields are saved with
    each checkpoint.

    input_size (`int`): latent height = width the model (and its position embedding) is built for.
    patch_size (`int`): side of the square patches; must divide input_size.
    in_channels (`int`): latent channels (3 in pixel space, 16 for the SD3 VAE).
    hidden_size (`int`), depth (`int`), num_heads (`int`): transformer width, blocks, heads.
    mlp_ratio (`float`): MLP hidden = mlp_ratio * hidden_size.
    qk_norm (`bool`): RMSNorm on queries and keys.
    base_size (`int` or None): grid size whose coordinate range the position embedding
        spans (PixArt interpolation); None = this model's own grid.
    interpolation_scale (`float`): PixArt's pos-embed interpolation scale.
    Precision is not part of it: models are built with nn.Linear (models/linear.py converts them).
    """

    input_size: int = 32
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    qk_norm: bool = True
    base_size: int | None = None
    interpolation_scale: float = 1.0

    def __post_init__(self):
        check_transformer_shape(self.input_size, self.patch_size, self.hidden_size, self.num_heads)

    @property
    def grid_size(self) -> int:
        return self.input_size // self.patch_size


def check_transformer_shape(input_size: int, patch_size: int, hidden_size: int, num_heads: int) -> None:
    """The shape rules every DiT here obeys, with messages that say what to change."""
    if input_size % patch_size:
        raise ValueError(
            f"input_size={input_size} is not divisible by patch_size={patch_size}: "
            "choose a resolution that is a multiple of the patch size (times the VAE's downsampling)"
        )
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size={hidden_size} is not divisible by num_heads={num_heads}")
    if hidden_size % 4:
        raise ValueError(f"hidden_size={hidden_size} must be divisible by 4 (2-D sin-cos embedding)")


def basic_init(model: nn.Module) -> None:
    """DiT's base initialization: Xavier-uniform linears with zero bias, the patch conv like a linear."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, PatchEmbed):
            w = module.proj.weight.data
            nn.init.xavier_uniform_(w.view(w.shape[0], -1))
            nn.init.zeros_(module.proj.bias)


# ---------------------------------------------------------------- position embedding
def sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """(M,) positions -> (M, dim) as [sin, cos], the DiT / diffusers layout."""
    assert dim % 2 == 0, "sin-cos embedding needs an even dimension"
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    out = pos.reshape(-1).to(torch.float64)[:, None] * omega[None]  # (M, dim/2)
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_2d(dim: int, grid_h: int, grid_w: int, base_size: int, interpolation_scale: float = 1.0,
              isotropic: bool = False, short_side: bool = False) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding with PixArt-style interpolation.

    Coordinates are rescaled so a grid of any size spans the range of a
    ``base_size`` grid (divided by ``interpolation_scale``): a model trained at
    one resolution sees familiar positions at another. PixArt (and diffusers)
    stretch each axis on its own, so on a 1:2 grid a patch is twice as far apart
    along one axis as along the other; ``isotropic`` uses one step for both axes,
    the one a square grid with the same number of patches gets, so shapes keep
    their proportions in position space at every aspect ratio. ``short_side``
    uses one step for both axes too, the one that makes the short side span the
    base range, and centres the grid on the square grid's centre: sizes that
    scale with the short side (as the demo's shapes do) come out as on the square
    grid, and the long axis runs past the base range equally at both ends (it takes
    precedence over ``isotropic``). All
    three are PixArt's grid on square grids. Token order is row-major (h, w); the
    first half of the channels encodes the column, the second the row, exactly as
    diffusers' ``get_2d_sincos_pos_embed``.

    Returns (grid_h * grid_w, dim) in float32.
    """
    assert dim % 4 == 0, "2-D sin-cos embedding needs dim divisible by 4"
    if short_side:
        step_h = step_w = base_size / min(grid_h, grid_w) / interpolation_scale
    elif isotropic:
        step_h = step_w = base_size / (grid_h * grid_w) ** 0.5 / interpolation_scale
    else:
        step_h, step_w = base_size / grid_h / interpolation_scale, base_size / grid_w / interpolation_scale
    ys = torch.arange(grid_h, dtype=torch.float64) * step_h
    xs = torch.arange(grid_w, dtype=torch.float64) * step_w
    if short_side:  # centred: zero shift on square grids, where grid * step spans the base range
        span = base_size / interpolation_scale
        ys, xs = ys + (span - grid_h * step_h) / 2, xs + (span - grid_w * step_w) / 2
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")  # (H, W) each
    emb = torch.cat([sincos_1d(dim // 2, xx), sincos_1d(dim // 2, yy)], dim=1)
    return emb.float()


# ---------------------------------------------------------------- embedders
class PatchEmbed(nn.Module):
    """(N, C, H, W) -> (N, T, D) with T = (H / p) * (W / p), non-overlapping patches."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


def unpatchify(x: torch.Tensor, patch_size: int, channels: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """(N, T, p*p*C) -> (N, C, H, W) with H = grid_h * p: PatchEmbed's layout undone."""
    n = x.shape[0]
    p = patch_size
    x = x.reshape(n, grid_h, grid_w, p, p, channels)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(n, channels, grid_h * p, grid_w * p)


def timestep_sinusoid(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """(N,) timesteps (already x1000) -> (N, dim) as [cos, sin] (diffusers flip_sin_to_cos=True)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class TimestepEmbedder(nn.Module):
    """Flow time t in [0, 1] -> (N, D). The model sees t * 1000, as diffusers' schedulers feed it."""

    def __init__(self, hidden_size: int, frequency_size: int = 256, time_scale: float = 1000.0):
        super().__init__()
        self.frequency_size = frequency_size
        self.time_scale = time_scale
        self.linear_1 = nn.Linear(frequency_size, hidden_size)
        self.linear_2 = nn.Linear(hidden_size, hidden_size)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        freq = timestep_sinusoid(t * self.time_scale, self.frequency_size)
        freq = freq.to(self.linear_1.weight.dtype)
        return self.linear_2(F.silu(self.linear_1(freq)))


class LabelEmbedder(nn.Module):
    """Class ids (N,) -> (N, D). Index ``num_classes`` is the null class used for CFG."""

    def __init__(self, num_classes: int, hidden_size: int):
        super().__init__()
        self.num_classes = num_classes
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    @property
    def null_class(self) -> int:
        return self.num_classes

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(labels)


# ---------------------------------------------------------------- attention and MLP
def _cpu_autocast(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" and torch.is_autocast_enabled("cpu")


def heads_dtype(y: torch.Tensor) -> torch.Tensor:
    """A projection's output on its way to QK-norm and attention: fp32 under CPU autocast (the
    norms' weights are fp32, and ``attention`` runs in fp32 there), unchanged otherwise."""
    return y.float() if _cpu_autocast(y) else y


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``scaled_dot_product_attention``; in fp32 under CPU bf16 autocast, where PyTorch's CPU flash
    attention (its backward above all) is slower in bf16 than in fp32. The matmuls around it stay in bf16."""
    if _cpu_autocast(q):
        with torch.autocast("cpu", enabled=False):
            return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=attn_mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)


class Attention(nn.Module):
    """Multi-head attention over ``scaled_dot_product_attention``, optional QK RMSNorm.

    Self-attention when ``context`` is None, else cross-attention to it
    (``context_dim`` may differ from ``dim``). ``mask`` is a boolean (N, S) key
    mask, True = attend; pass None when nothing is padded (no mask is cheaper).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qk_norm: bool = True,
        context_dim: int | None = None,
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.is_cross = context_dim is not None
        kv_dim = context_dim if context_dim is not None else dim
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(kv_dim, dim)
        self.to_v = nn.Linear(kv_dim, dim)
        self.norm_q = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.norm_k = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.to_out = nn.Linear(dim, dim)

    def keys_values(self, kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, S, D) -> keys (QK-normed) and values, (N, h, S, hd) each."""
        n, s, _ = kv.shape
        k = heads_dtype(self.to_k(kv)).view(n, s, self.num_heads, self.head_dim).transpose(1, 2)
        v = heads_dtype(self.to_v(kv)).view(n, s, self.num_heads, self.head_dim).transpose(1, 2)
        return self.norm_k(k), v

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                kv: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """``kv``: this layer's ``keys_values(context)`` computed beforehand (sampling reuses a
        constant text's across steps); ``context`` is then not needed."""
        n, t, d = x.shape
        q = self.norm_q(heads_dtype(self.to_q(x)).view(n, t, self.num_heads, self.head_dim).transpose(1, 2))  # (N, h, T, hd)
        k, v = kv if kv is not None else self.keys_values(x if context is None else context)  # (N, h, S, hd)
        attn_mask = None if mask is None else mask[:, None, None, :]  # (N, 1, 1, S)
        out = attention(q, k, v, attn_mask=attn_mask)  # (N, h, T, hd)
        return self.to_out(out.transpose(1, 2).reshape(n, t, d))


class MLP(nn.Module):
    """D -> ratio*D -> D with GELU (tanh approximation, as DiT and PixArt).

    Without autograd (sampling), the hidden activation is the largest tensor a block makes:
    there the GELU runs in place, and on CPU the tokens go through in chunks of at most
    ``INFERENCE_CHUNK_BYTES`` of hidden activation, so each chunk's buffer is reused from the
    heap instead of fresh pages (fewer page faults). Same function (tested).
    """

    INFERENCE_CHUNK_BYTES = 16 << 20

    def __init__(self, dim: int, mlp_ratio: float = 4.0):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() or torch.compiler.is_compiling():  # autograd keeps both activations
            return self.fc2(gelu_tanh(self.fc1(x)))
        return self._inference(x)

    def _inference(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        chunk = rows.shape[0]
        if x.device.type == "cpu":
            chunk = max(1, self.INFERENCE_CHUNK_BYTES // (self.fc1.out_features * x.element_size()))
        outs = []
        for i in range(0, rows.shape[0], chunk):
            h = self.fc1(rows[i:i + chunk])
            outs.append(self.fc2(torch.ops.aten.gelu_(h, approximate="tanh")))
        out = outs[0] if len(outs) == 1 else torch.cat(outs)
        return out.view(*x.shape[:-1], out.shape[-1])


class DiTBlockLayers(nn.Module):
    """The sub-layers every DiT block here has, under the names both families share
    (``norm1``, ``attn``, ``norm2``, ``mlp``): the 1->2 reparameterization copies them by name.
    Each family's block adds its own conditioning and writes its own forward."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, qk_norm: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads, qk_norm=qk_norm)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = MLP(hidden_size, mlp_ratio)
