"""The training step, written once: the trainer and every benchmark that times a step call it.

The objective (flow/objectives.py; rectified flow unless the run says otherwise): draw t, make the
noisy input, predict (velocity, or DDPM noise), MSE; the
gradient accumulated over micro-batches, clipped, then the optimizer step and the EMA update.
How the model is spread over ranks (DDP, FSDP2, fused weight gradients) reaches the step only
through a :class:`Local`-like object, so a benchmark passes ``Local(model)`` and times exactly
what the trainer runs.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Iterable

import torch
import torch.nn as nn

from flow.objectives import FLOW, Objective
from inference.pipeline import call_model
from models.layers import unpatchify
from training.ema import update_ema


def step_generator(seed: int, rank: int, step: int, device: torch.device) -> torch.Generator:
    """The random stream of one training step on one rank: a pure function of (seed, rank, step),
    so a resumed run draws exactly the noise, timesteps and dropout an uninterrupted one would."""
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + rank) * 10_000_019 + step)
    return g


@dataclass
class MicroBatch:
    """The step's inputs: x0 (N, C, H, W) normalized latents, cond (the model's condition keyword
    arguments), t (N,) model times in [0, 1], noise (N, C, H, W); extra (N, K) uniform numbers for a
    loss that draws more (distillation: training/distill.py), None otherwise; route (N, T) uniform
    scores that pick the tokens a routed model keeps (models/routing.py), None without routing;
    loss_weight (N, 1, H, W) of 0/1: the only pixels the loss counts (a masked model's kept tokens), None: all;
    images (N, 3, H', W') in [-1, 1]: the pixels x0 encodes, where the shards store them (REPA), else None."""

    x0: torch.Tensor
    cond: dict[str, Any]
    t: torch.Tensor
    noise: torch.Tensor
    extra: torch.Tensor | None = None
    route: torch.Tensor | None = None
    loss_weight: torch.Tensor | None = None
    images: torch.Tensor | None = None

    @classmethod
    def draw(cls, x0: torch.Tensor, cond: dict[str, Any], logit_mean: float = 0.0, logit_std: float = 1.0, shift: float = 1.0,
             gen: torch.Generator | None = None, objective: Objective = FLOW, extra: int = 0, route_tokens: int = 0) -> "MicroBatch":
        """Timesteps (flow: logit-normal, shifted; epsilon: uniform steps), then noise, then ``extra`` uniform
        numbers per sample, then ``route_tokens`` route scores per sample, from ``gen`` (a draw that is
        off takes nothing from the stream, so the others are as without it)."""
        t = objective.draw_t(x0.shape[0], logit_mean, logit_std, shift, gen, x0.device)
        noise = torch.randn(x0.shape, generator=gen, device=x0.device)
        more = torch.rand((x0.shape[0], extra), generator=gen, device=x0.device) if extra else None
        route = torch.rand((x0.shape[0], route_tokens), generator=gen, device=x0.device) if route_tokens else None
        return cls(x0, cond, t, noise, more, route)

    @property
    def model_cond(self) -> dict[str, Any]:
        """The model's keyword arguments for this batch: the condition, and the route scores if any."""
        return self.cond if self.route is None else {**self.cond, "route_scores": self.route}


class Local:
    """One process, one model: no gradient synchronization. ``module`` is what the step calls (the
    model itself, or a compiled or DDP-wrapped version of it); ``model`` holds the parameters."""

    def __init__(self, model: nn.Module, module: nn.Module | None = None):
        self.model, self.module = model, module if module is not None else model

    def sync(self, last_micro: bool) -> ContextManager:
        """The context a micro-batch's forward runs in: gradients are synchronized on the last only."""
        return contextlib.nullcontext()

    def reduce_gradients(self) -> None:
        """After the last backward, gradients that bypass the usual all-reduce (fused wgrad)."""

    def clip(self, max_norm: float) -> float:
        """Clip the gradient to ``max_norm``; its norm before clipping."""
        return float(nn.utils.clip_grad_norm_(self.model.parameters(), max_norm))

    def after_step(self) -> None:
        """After the update: reset what ``reduce_gradients`` used."""


@dataclass
class StepOutput:
    """losses: per micro-batch (mean loss, per-sample loss (N,), t (N,)), detached; grad_norm: before
    clipping; applied: False when ``may_apply`` refused the update (a non-finite gradient)."""

    losses: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    grad_norm: float
    applied: bool


def objective_loss(module: nn.Module, mb: MicroBatch, objective: Objective = FLOW) -> torch.Tensor:
    """The objective's per-sample loss (N,) of ``module`` on one micro-batch: the plain step's, and
    the part of a composite loss (training/alignment.py) that is the plain one."""
    pred = call_model(module, objective.noisy(mb.x0, mb.noise, mb.t), mb.t, mb.model_cond)  # (N, C or 2C, H, W)
    return objective.loss(pred, mb.x0, mb.noise, mb.loss_weight)


def token_pixels(tokens: torch.Tensor, patch_size: int, shape: torch.Size) -> torch.Tensor:
    """(N, T) per-token values of a (N, C, H, W) batch -> (N, 1, H, W) float, each patch's pixels
    holding its token's value: the models' own token layout (models/layers.py unpatchify)."""
    n, _, h, w = shape
    p = patch_size
    if (h // p) * (w // p) != tokens.shape[1]:
        raise ValueError(f"{tokens.shape[1]} tokens for a {h}x{w} latent in {p}x{p} patches ({(h // p) * (w // p)} tokens)")
    return unpatchify(tokens[..., None].float().expand(-1, -1, p * p), p, 1, h // p, w // p)


def train_step(parallel: Local, optimizer: torch.optim.Optimizer, micro_batches: Iterable[MicroBatch], accum: int, *,
               grad_clip: float, forward_context: Callable[[], ContextManager] = contextlib.nullcontext,
               may_apply: Callable[[float], bool] | None = None, ema: nn.Module | None = None, ema_decay: float = 0.0,
               objective: Objective = FLOW, loss_fn: Callable[[nn.Module, nn.Module | None, MicroBatch], torch.Tensor] | None = None
               ) -> StepOutput:
    """One optimizer step over ``accum`` micro-batches (read lazily from ``micro_batches``, so a data
    loader can feed them): forward and loss under ``forward_context`` (autocast, FP8), backward,
    then the gradient clipped, and unless ``may_apply(grad_norm)`` says no, the update and the EMA.
    ``loss_fn(module, ema, micro_batch)`` -> per-sample loss replaces the objective's (distillation)."""
    losses = []
    for i, mb in zip(range(accum), micro_batches):
        with parallel.sync(i == accum - 1), forward_context():
            if loss_fn is not None:
                per_sample = loss_fn(parallel.module, ema, mb)  # (N,)
            else:
                per_sample = objective_loss(parallel.module, mb, objective)  # (N,)
            loss = per_sample.mean() / accum
        loss.backward()
        losses.append((loss.detach() * accum, per_sample.detach(), mb.t))
    parallel.reduce_gradients()
    grad_norm = parallel.clip(grad_clip)
    applied = may_apply is None or may_apply(grad_norm)
    if applied:
        optimizer.step()
        if ema is not None:
            update_ema(ema, parallel.model, ema_decay)
    optimizer.zero_grad(set_to_none=True)
    parallel.after_step()
    return StepOutput(losses, grad_norm, applied)
