"""How a model trains across ranks: DDP (or one process) or FSDP2, with optional fused weight
gradients, activation checkpointing and torch.compile. The training step sees only the
:class:`Parallel` interface (training/step.py ``Local``); saving and sampling get full weights
from it whatever the layout."""
from __future__ import annotations

import contextlib
from typing import ContextManager

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from training import fsdp, fused_wgrad
from training.config import ConfigError
from training.distributed import DistInfo, replica_divergence
from training.optim import make_optimizer
from training.step import Local


class Parallel(Local):
    """``model``: the raw module (checkpoints and the EMA read it); ``module``: what the step calls
    (DDP-wrapped, compiled); ``fused``: the weights whose gradients the fused-wgrad protocol reduces."""

    def __init__(self, model: nn.Module, module: nn.Module, dist_info: DistInfo, use_fsdp: bool,
                 fused: list[tuple[str, nn.Parameter]]):
        super().__init__(model, module)
        self.dist_info, self.use_fsdp, self.fused = dist_info, use_fsdp, fused

    def sync(self, last_micro: bool) -> ContextManager:
        if self.use_fsdp:  # reduce-scatter only on the last micro-batch
            self.model.set_requires_gradient_sync(last_micro)
            return contextlib.nullcontext()
        if last_micro or not self.dist_info.enabled:
            return contextlib.nullcontext()
        return self.module.no_sync()

    def reduce_gradients(self) -> None:
        if self.fused:  # fused wgrad: average main_grad across ranks ourselves, then hand it to the optimizer
            fused_wgrad.reduce_and_publish(self.fused, self.dist_info.world_size)

    def clip(self, max_norm: float) -> float:
        norm = nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)  # of the all-reduced gradient
        return fsdp.scalar(norm) if self.use_fsdp else float(norm)

    def after_step(self) -> None:
        if self.fused:
            fused_wgrad.zero(self.fused)

    def check_replicas(self, at_step: int) -> float | None:
        """Largest parameter difference across DDP replicas (None under FSDP: shards, not replicas)."""
        if self.use_fsdp:
            return None
        divergence = replica_divergence(self.model, self.dist_info)
        if divergence > 1e-6:
            raise RuntimeError(f"DDP replicas diverged at step {at_step} (max parameter difference {divergence:.3g})")
        return divergence

    def full_weights(self, module: nn.Module) -> nn.Module | dict:
        """``module``'s weights as savers read them: the module itself, or under FSDP its full state
        dict gathered on rank 0 (collective: every rank calls it)."""
        return fsdp.full_state(module) if self.use_fsdp else module

    def full_optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict | None:
        if self.use_fsdp:  # collective
            return fsdp.full_optimizer_state(self.model, optimizer)
        return optimizer.state_dict() if self.dist_info.is_main else None

    @property
    def optimizer_format(self) -> str:
        return "fsdp_full" if self.use_fsdp else "torch"


def wrap(cfg, model: nn.Module, ema: nn.Module, optimizer: torch.optim.Optimizer, optimizer_state: dict | None,
         dist_info: DistInfo, use_fsdp: bool, num_buckets: int) -> tuple[Parallel, torch.optim.Optimizer]:
    """Activation checkpointing, fused wgrad, then FSDP2 sharding or DDP, then torch.compile.
    Returns the Parallel the step trains through and the optimizer (rebuilt on the shards under FSDP)."""
    model.gradient_checkpointing = bool(cfg.train.activation_checkpointing)
    fused = []
    if cfg.precision.get("fuse_wgrad"):
        if use_fsdp:
            raise ConfigError("precision.fuse_wgrad works with DDP, not with train.parallel=fsdp")
        try:
            fused = fused_wgrad.enable(model)
        except ValueError as e:
            raise ConfigError(str(e)) from e
        if dist_info.enabled:
            fused_wgrad.exclude_from_ddp(model, fused)
    if use_fsdp:  # shard the loaded weights, then build the optimizer on the shards
        fsdp.shard(model, ema, dist_info.device, dist_info.world_size)
        optimizer = make_optimizer(model, cfg.train.lr, cfg.train.weight_decay, cfg.train.betas)
        if optimizer_state is not None:
            fsdp.load_optimizer_state(model, optimizer, optimizer_state)
        module = model
    else:
        module = DDP(model) if dist_info.enabled else model
    if cfg.train.compile:
        if num_buckets:  # one static graph per bucket: torch 2.13's dynamic-shape graph broke in backward on a bucket change
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, num_buckets + 2)
        module = torch.compile(module, dynamic=False if num_buckets else None, mode=cfg.train.compile_mode)
    return Parallel(model, module, dist_info, use_fsdp, fused), optimizer
