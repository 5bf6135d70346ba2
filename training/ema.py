"""Exponential moving average of the model's weights (kept on every rank, in eval mode)."""
from __future__ import annotations

import copy

import torch
import torch.nn as nn


def make_ema(model: nn.Module) -> nn.Module:
    ema = copy.deepcopy(model).eval()
    ema.requires_grad_(False)
    return ema


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema = decay * ema + (1 - decay) * model; decay 0 copies the model. Frozen weights (an adapter
    run's base) are equal in both and skipped."""
    for e, m in zip(ema.parameters(), model.parameters()):
        if m.requires_grad:
            e.lerp_(m.detach(), 1.0 - decay)


def ema_decay_at(step: int, decay: float, warmup: bool = True, restart: int | None = None) -> float:
    """The EMA decay at ``step``: with ``warmup`` min(decay, (1 + s) / (10 + s)), so early weights fade
    fast; without (a fine-tune from trained weights, train.ema_warmup=false) ``decay`` throughout.
    ``restart``: from this step on, s counts from it (the warm-up again: a new regime's average
    forgets the weights of the one before)."""
    s = step - restart if restart is not None and step >= restart else step
    return min(decay, (1 + s) / (10 + s)) if warmup else decay
