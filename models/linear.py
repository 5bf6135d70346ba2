"""Linear-layer precision: the backends and the converter that applies one to a built model.

Models are built with plain ``nn.Linear`` and know nothing of precision. After construction,
:func:`convert` swaps every linear outside the modules the model class declares high precision
(its ``_keep_in_high_precision`` tuple: embedders, the final projection) for the backend named
by ``precision.linear``:

- ``torch``: plain ``nn.Linear`` (bf16 autocast on GPU is the trainer's business).
- ``mxfp8_emulated``: MXFP8 in pure PyTorch (runs on CPU): both GEMM operands are
  fake-quantized to E4M3 in blocks of 32 along the reduction dimension, each block
  with a power-of-two (E8M0) scale; the backward pass quantizes the gradient the
  same way for both of its GEMMs (straight-through for the rounding itself).
- ``te``: Transformer Engine's ``te.Linear``, run under TE's FP8 autocast by the
  trainer. Asking for it where TE is not installed is an error, never a fallback.

The swap keeps the model's parameters (the same tensors move into the new module), so the
weights, their initialization and a checkpoint are the same whatever the backend. Adapters
(LoRA) attach by the same after-construction mechanism, :func:`swap_linears`.
"""
from __future__ import annotations

from typing import Callable

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


_MX_ADVICE = "(and MLP ratio) that keep every projection a multiple of 32, or use precision.linear=torch"


class MXFP8EmulatedLinear(nn.Linear):
    """nn.Linear whose GEMMs (forward, dgrad, wgrad) run on MXFP8-quantized operands.

    ``fuse_wgrad_accumulation`` (as in TE): the weight gradient is added to ``weight.main_grad``
    (fp32) instead of ``weight.grad``; training/fused_wgrad.py all-reduces it (DDP cannot see it).
    """

    fuse_wgrad_accumulation = False

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__(in_features, out_features, bias=bias)
        check_dims(self, MX_BLOCK, "MXFP8", _MX_ADVICE)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "MXFP8EmulatedLinear":
        """The same layer (the same parameter tensors) computing in MXFP8."""
        check_dims(linear, MX_BLOCK, "MXFP8", _MX_ADVICE)
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight, new.bias = linear.weight, linear.bias
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _MXFP8LinearFn.apply(x, self.weight, self.bias, self.fuse_wgrad_accumulation)


def check_dims(linear: nn.Linear, multiple: int, what: str, advice: str) -> None:
    for name in ("in_features", "out_features"):
        size = getattr(linear, name)
        if size % multiple:
            raise ValueError(f"{what} needs linear dimensions divisible by {multiple}, but {name}={size}; choose a hidden size {advice}")


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


def te_linear(linear: nn.Linear) -> nn.Module:
    """A ``te.Linear`` holding a copy of ``linear``'s weights (TE allocates its own parameters)."""
    check_dims(linear, 16, "FP8 GEMMs", "that keeps every projection a multiple of 16")
    w = linear.weight
    # fuse_wgrad_accumulation is switched on later, per module, by training/fused_wgrad.py
    new = transformer_engine().Linear(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                      params_dtype=w.dtype, device=w.device)
    with torch.no_grad():
        new.weight.copy_(w)
        if linear.bias is not None:
            new.bias.copy_(linear.bias)
    return new


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


# ---------------------------------------------------------------- the converter
def high_precision(model: nn.Module) -> tuple[str, ...]:
    """The submodule names a model class keeps in high precision (``_keep_in_high_precision``)."""
    names = getattr(type(model), "_keep_in_high_precision", None)
    if names is None:
        raise TypeError(f"{type(model).__name__} declares no _keep_in_high_precision: say which modules stay in high precision")
    return tuple(names)


def swap_linears(model: nn.Module, make: Callable[[str, nn.Linear], nn.Module]) -> list[str]:
    """Replace every plain ``nn.Linear`` outside the model's high-precision modules by ``make(name, linear)``
    and return the names replaced: how a precision backend, and an adapter, attach to a built model."""
    keep = high_precision(model)
    targets = [(name, m) for name, m in model.named_modules()
               if type(m) is nn.Linear and not any(name == k or name.startswith(k + ".") for k in keep)]
    for name, linear in targets:
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, make(name, linear))
    return [name for name, _ in targets]


def convert(model: nn.Module, backend: str) -> nn.Module:
    """``model`` with its linears computing in ``backend`` (in place; returned for chaining). ``torch``
    changes nothing. The parameters stay the same tensors (MXFP8) or are copied (TE)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown linear backend {backend!r}; expected one of {BACKENDS}")
    if backend == "mxfp8_emulated":
        swap_linears(model, lambda name, linear: MXFP8EmulatedLinear.from_linear(linear))
    elif backend == "te":
        swap_linears(model, lambda name, linear: te_linear(linear))
    return model


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


__all__ = ["BACKENDS", "convert", "swap_linears", "high_precision", "fp8_context", "mx_quantize", "mx_scales", "MXFP8EmulatedLinear",
           "transformer_engine", "portable_state_dict", "load_portable"]
