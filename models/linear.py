"""The linear-layer factory: the one place a model's matmul precision is decided.

Model files never construct ``nn.Linear`` for their heavy projections themselves;
they call :func:`make_linear` with the backend named by ``precision.linear``:

- ``torch``: plain ``nn.Linear`` (bf16 autocast on GPU is the trainer's business).
- ``mxfp8_emulated``: MXFP8 in pure PyTorch (runs on CPU): both GEMM operands are
  fake-quantized to E4M3 in blocks of 32 along the reduction dimension, each block
  with a power-of-two (E8M0) scale; the backward pass quantizes the gradient the
  same way for both of its GEMMs (straight-through for the rounding itself).
- ``te``: Transformer Engine's ``te.Linear``, run under TE's FP8 autocast by the
  trainer. Asking for it where TE is not installed is an error, never a fallback.

Layers that must stay in high precision (embedders, the final projection) are
built with ``nn.Linear`` directly and named in the model class's
``_keep_in_high_precision`` tuple.
"""
from __future__ import annotations

import torch
import torch.nn as nn

BACKENDS = ("torch", "mxfp8_emulated", "te")
MX_BLOCK = 32
E4M3_MAX = 448.0  # largest finite E4M3 value
E8M0_MIN_EXP, E8M0_MAX_EXP = -127, 127


# ---------------------------------------------------------------- MXFP8 emulation
def mx_scales(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Per-block power-of-two scales along ``dim`` (size divisible by 32), shape of x with dim // 32.

    The scale is the smallest power of two with block_max / scale <= 448, so nothing
    in a block saturates; the exponent is clamped to E8M0's range [-127, 127]. An
    all-zero block gets scale 1.
    """
    xb = x.movedim(dim, -1)
    xb = xb.reshape(*xb.shape[:-1], xb.shape[-1] // MX_BLOCK, MX_BLOCK)
    amax = xb.abs().amax(-1).float()
    exp = torch.ceil(torch.log2(amax / E4M3_MAX))
    exp = torch.where(amax > 0, exp, torch.zeros_like(exp)).clamp(E8M0_MIN_EXP, E8M0_MAX_EXP)
    return torch.exp2(exp).movedim(-1, dim)


def mx_quantize(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Fake-quantize ``x`` to MXFP8 (E4M3 elements, E8M0 block scales) along ``dim``; same shape and dtype.

    A ``dim`` whose size is not a multiple of 32 is zero-padded for the scales
    (zeros never change a block's max) and cropped back.
    """
    dim = dim % x.dim()
    n = x.shape[dim]
    pad = (-n) % MX_BLOCK
    xf = x.float()
    if pad:
        shape = list(xf.shape)
        shape[dim] = pad
        xf = torch.cat([xf, xf.new_zeros(shape)], dim=dim)
    scale = mx_scales(xf, dim).repeat_interleave(MX_BLOCK, dim=dim)
    q = (xf / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).float() * scale
    if pad:
        q = q.narrow(dim, 0, n)
    return q.to(x.dtype)


class _MXFP8LinearFn(torch.autograd.Function):
    """y = Q(x) Q(W)^T + b, each operand quantized along the GEMM's reduction dimension."""

    @staticmethod
    def forward(ctx, x, weight, bias, fuse_wgrad=False):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        ctx.fuse_wgrad = fuse_wgrad
        y = mx_quantize(x, -1) @ mx_quantize(weight, 1).t()  # reduce over in_features
        return y + bias if bias is not None else y

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        g2 = grad_out.reshape(-1, grad_out.shape[-1])  # (tokens, out)
        x2 = x.reshape(-1, x.shape[-1])  # (tokens, in)
        grad_x = (mx_quantize(g2, 1) @ mx_quantize(weight, 0)).reshape(x.shape)  # reduce over out_features
        grad_w = mx_quantize(g2, 0).t() @ mx_quantize(x2, 0)  # reduce over tokens
        grad_b = g2.sum(0) if ctx.has_bias else None
        if ctx.fuse_wgrad:  # TE's fuse_wgrad_accumulation: accumulate into main_grad, give autograd nothing
            weight.main_grad.add_(grad_w.to(weight.main_grad.dtype))
            grad_w = None
        return grad_x, grad_w, grad_b, None


class MXFP8EmulatedLinear(nn.Linear):
    """nn.Linear whose GEMMs (forward, dgrad, wgrad) run on MXFP8-quantized operands.

    ``fuse_wgrad_accumulation`` (as in TE): the weight gradient is added to ``weight.main_grad``
    (fp32) instead of ``weight.grad``; training/fused_wgrad.py all-reduces it (DDP cannot see it).
    """

    fuse_wgrad_accumulation = False

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        for name, size in (("in_features", in_features), ("out_features", out_features)):
            if size % MX_BLOCK:
                raise ValueError(
                    f"MXFP8 needs linear dimensions divisible by {MX_BLOCK}, but {name}={size}; choose a hidden size "
                    f"(and MLP ratio) that keep every projection a multiple of {MX_BLOCK}, or use precision.linear=torch"
                )
        super().__init__(in_features, out_features, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _MXFP8LinearFn.apply(x, self.weight, self.bias, self.fuse_wgrad_accumulation)


# ---------------------------------------------------------------- Transformer Engine
def transformer_engine():
    """Import Transformer Engine's PyTorch API or stop with what to do instead."""
    try:
        import transformer_engine.pytorch as te  # noqa: F401
    except (ImportError, RuntimeError) as e:  # the bare meta-package raises RuntimeError on import
        raise RuntimeError(
            f"precision.linear=te needs NVIDIA Transformer Engine with its PyTorch extension ({type(e).__name__}: {e}). "
            "Install transformer-engine[pytorch] on a CUDA machine, or use precision.linear=torch (bf16) "
            "or precision.linear=mxfp8_emulated (FP8 numerics, slow, any device)."
        ) from e
    return te


def _te_linear(in_features: int, out_features: int, bias: bool) -> nn.Module:
    for name, size in (("in_features", in_features), ("out_features", out_features)):
        if size % 16:
            raise ValueError(f"FP8 GEMMs need linear dimensions divisible by 16, but {name}={size}")
    # fuse_wgrad_accumulation is switched on later, per module, by training/fused_wgrad.py
    return transformer_engine().Linear(in_features, out_features, bias=bias)


TE_RECIPES = ("auto", "mxfp8", "current", "delayed")


def te_recipe(name: str = "auto"):
    """The TE recipe for this GPU: MXFP8 block scaling on Blackwell (sm_100+), FP8 current
    scaling on Hopper (sm_90); ``name`` forces one. Stops with a message where FP8 can't run."""
    import torch
    from transformer_engine.common import recipe as te_recipes  # noqa: F401  (TE is importable: checked by caller)

    if not torch.cuda.is_available():
        raise RuntimeError("precision.linear=te needs a CUDA GPU (Hopper or Blackwell); use mxfp8_emulated on CPU")
    major, minor = torch.cuda.get_device_capability()
    if name == "auto":
        if major < 9:
            raise RuntimeError(
                f"FP8 needs a Hopper (sm_90) or Blackwell (sm_100) GPU; this one is sm_{major}{minor}. "
                "Use precision.linear=torch (bf16) here."
            )
        name = "mxfp8" if major >= 10 else "current"
    if name == "mxfp8" and major < 10:
        raise RuntimeError(f"MXFP8 block scaling needs a Blackwell GPU (sm_100+); this one is sm_{major}{minor}. Use precision.te_recipe=current")
    if name == "mxfp8":
        return te_recipes.MXFP8BlockScaling()
    if name == "current":
        return te_recipes.Float8CurrentScaling()
    if name == "delayed":
        return te_recipes.DelayedScaling(fp8_format=te_recipes.Format.HYBRID, amax_history_len=16, amax_compute_algo="max")
    raise ValueError(f"unknown precision.te_recipe {name!r}; expected one of {TE_RECIPES}")


def fp8_context(backend: str, recipe_name: str = "auto"):
    """The context the forward pass runs in: TE's FP8 autocast for ``te``, nothing otherwise."""
    import contextlib

    if backend != "te":
        return contextlib.nullcontext()
    te = transformer_engine()
    recipe = te_recipe(recipe_name)
    if hasattr(te, "autocast"):  # TE >= 2.8 names it autocast(recipe=...)
        return te.autocast(enabled=True, recipe=recipe)
    return te.fp8_autocast(enabled=True, fp8_recipe=recipe)


def is_linear(module: nn.Module) -> bool:
    """Any backend's linear: ``nn.Linear`` (and the emulated MXFP8 one) or TE's ``te.Linear``, which is not
    an ``nn.Linear``, so initialization that looks only for those would leave TE's own init in place."""
    return isinstance(module, nn.Linear) or (
        type(module).__name__ == "Linear" and type(module).__module__.startswith("transformer_engine")
    )


def make_linear(in_features: int, out_features: int, bias: bool = True, backend: str = "torch") -> nn.Module:
    """Build a linear layer ``(..., in_features) -> (..., out_features)`` for ``backend``."""
    if backend == "torch":
        return nn.Linear(in_features, out_features, bias=bias)
    if backend == "mxfp8_emulated":
        return MXFP8EmulatedLinear(in_features, out_features, bias=bias)
    if backend == "te":
        return _te_linear(in_features, out_features, bias)
    raise ValueError(f"unknown linear backend {backend!r}; expected one of {BACKENDS}")


# ---------------------------------------------------------------- weights that travel between backends
# Every backend keeps the same full-precision ``weight`` / ``bias`` parameters, so a checkpoint trained
# with one loads into a model built with another. TE modules add an ``_extra_state`` entry (FP8 scaling
# history, pickled by TE): it is dropped on save (a checkpoint never carries pickle) and not expected on load.
EXTRA_STATE = "_extra_state"


def is_extra_state(key: str) -> bool:
    return key == EXTRA_STATE or key.endswith("." + EXTRA_STATE)


def portable_state_dict(state: dict) -> dict:
    """``state`` without TE's pickled ``_extra_state`` entries."""
    return {k: v for k, v in state.items() if not is_extra_state(k)}


def load_portable(model: nn.Module, state: dict) -> None:
    """``model.load_state_dict(state)``, strict except for the ``_extra_state`` entries of TE modules
    (absent from our checkpoints, rebuilt by TE at the first FP8 step)."""
    missing, unexpected = model.load_state_dict(portable_state_dict(state), strict=False)
    missing = [k for k in missing if not is_extra_state(k)]
    if missing or unexpected:
        raise RuntimeError(f"weights do not fit {type(model).__name__}: missing {missing[:8]}, unexpected {unexpected[:8]}")


__all__ = ["BACKENDS", "make_linear", "fp8_context", "mx_quantize", "mx_scales", "MXFP8EmulatedLinear", "transformer_engine",
           "portable_state_dict", "load_portable", "is_linear"]
