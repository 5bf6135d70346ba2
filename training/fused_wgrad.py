"""Fused weight-gradient accumulation (TE's ``fuse_wgrad_accumulation``) done correctly under DDP.

With fusion, a linear's backward adds its weight gradient straight into an fp32
``weight.main_grad`` buffer and leaves ``weight.grad`` empty. DDP's all-reduce hooks only
see ``.grad``, so those gradients are never averaged across ranks and the replicas drift
apart. Here the fused weights are excluded from DDP
(``DDP._set_params_and_buffers_to_ignore_for_model``, the hook TE-based trainers use) and,
after the last micro-batch, their ``main_grad`` is all-reduced (mean) by us and handed to the
optimizer as ``.grad``. Works for ``te`` (``te.Linear``) and ``mxfp8_emulated`` linears.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from training.distributed import average_in_place


def _fusable(module: nn.Module) -> bool:
    return hasattr(type(module), "fuse_wgrad_accumulation") or type(module).__module__.startswith("transformer_engine")


def enable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Switch every fusable linear to fused wgrad and give its weight an fp32 ``main_grad``.
    Returns the (name, parameter) pairs whose gradient the protocol owns."""
    fused = []
    for name, module in model.named_modules():
        if _fusable(module) and isinstance(getattr(module, "weight", None), nn.Parameter):
            module.fuse_wgrad_accumulation = True
            w = module.weight
            w.main_grad = torch.zeros_like(w, dtype=torch.float32)
            fused.append((f"{name}.weight" if name else "weight", w))
    if not fused:
        raise ValueError("precision.fuse_wgrad needs precision.linear=te or mxfp8_emulated (plain torch linears have no fused wgrad)")
    return fused


def exclude_from_ddp(model: nn.Module, fused: list[tuple[str, nn.Parameter]]) -> None:
    """Call before wrapping in DDP: DDP must neither wait for nor reduce these gradients."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    DDP._set_params_and_buffers_to_ignore_for_model(model, [name for name, _ in fused])


def reduce_and_publish(fused: list[tuple[str, nn.Parameter]], world_size: int) -> None:
    """After the last micro-batch's backward: average main_grad over ranks, expose it as .grad."""
    average_in_place([p.main_grad for _, p in fused], world_size)
    for _, p in fused:
        p.grad = p.main_grad.to(p.dtype).clone()


def zero(fused: list[tuple[str, nn.Parameter]]) -> None:
    for _, p in fused:
        p.main_grad.zero_()
