"""AdamW with the usual decay groups, and a warmup + cosine learning-rate schedule."""
from __future__ import annotations

import math

import torch
import torch.nn as nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices only: no weight decay on norms, biases, embeddings or 1-D parameters."""
    decay, no_decay = [], []
    embedding_params = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.dim() < 2 or id(p) in embedding_params or "norm" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: nn.Module, lr: float, weight_decay: float, betas) -> torch.optim.Optimizer:
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=tuple(betas), eps=1e-8)


def lr_at(step: int, lr: float, warmup_steps: int, max_steps: int, min_lr_ratio: float = 1.0) -> float:
    """Linear warmup to ``lr``, then cosine to ``lr * min_lr_ratio`` at ``max_steps``.

    A pure function of the step: resuming needs no scheduler state.
    """
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if min_lr_ratio >= 1.0:
        return lr
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
