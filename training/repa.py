"""Representation alignment (REPA, Yu et al. 2025): a shallow block's image tokens, through a small
trained MLP (the projector), pulled toward a frozen pretrained vision encoder's patch features of the
clean image: a term ``weight * (1 - cos)`` per token, added to the objective's loss.

The clean image is the batch's latents decoded by the run's autoencoder (shards hold latents, not
pixels), resized so that the encoder's patches fall on the model's token grid
(models/vision_encoder.py). The projector is training-only: it lives in the training state
(``train_state.pt``: its weights and optimizer), never in the model's checkpoints, so a REPA run's
checkpoints sample, export and initialize later stages like any other. It is replicated on every
rank and its gradient averaged by hand (it sits outside the DDP-wrapped model). As with
self-alignment, the help is early: ``until`` switches the term off (HASTE), after which a step costs
what a plain one does.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from flow.objectives import Objective
from training.alignment import BlockOutput, alignment_loss
from training.distributed import DistInfo, all_reduce_mean, average_in_place
from training.step import objective_loss


@dataclass(frozen=True)
class RepaSettings:
    encoder: str | None = None  # hub id or local folder; None = off
    subfolder: str | None = None
    weight: float = 0.5  # REPA's lambda
    block: int = 1  # the block whose output is aligned
    projector_dim: int = 2048
    until: int | None = None  # the step the term is switched off at; None = never

    @classmethod
    def from_config(cls, node) -> "RepaSettings":
        keys = ("encoder", "subfolder", "weight", "block", "projector_dim", "until")
        return cls(**{k: node[k] for k in keys if node is not None and k in node})

    def check(self, depth: int) -> "RepaSettings":
        if not 0 <= self.block < depth:
            raise ValueError(f"block={self.block}: expected 0 <= block < depth ({depth})")
        if self.weight <= 0:
            raise ValueError(f"weight {self.weight}: expected > 0 (to switch REPA off, set train.repa.encoder=null)")
        if self.projector_dim < 1:
            raise ValueError(f"projector_dim {self.projector_dim}: expected >= 1")
        if self.until is not None and self.until < 1:
            raise ValueError(f"until {self.until}: the term would never be on; expected a step >= 1, or null (never off)")
        return self


def projector(width: int, hidden: int, out: int) -> nn.Sequential:
    """REPA's projector: a three-layer MLP with SiLU, from the model's width to the encoder's."""
    return nn.Sequential(nn.Linear(width, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, out))


class RepresentationAlignment:
    """The loss of a run with ``train.repa``: ``loss_at(step)`` gives the step's ``loss_fn`` for
    training/step.py, or None once the term is off; ``update`` steps the projector after the model's step."""

    def __init__(self, model: nn.Module, encoder: nn.Module, settings: RepaSettings, objective: Objective,
                 decode: Callable[[torch.Tensor], torch.Tensor], patch_size: int, width: int, betas, seed: int, dist_info: DistInfo):
        self.settings, self.objective, self.encoder, self.decode = settings, objective, encoder, decode
        self.patch_size, self.dist_info = patch_size, dist_info
        self.student = BlockOutput(model.blocks[settings.block])
        with torch.random.fork_rng(devices=[]):  # the same projector whatever was drawn before it
            torch.manual_seed(seed)
            self.projector = projector(width, settings.projector_dim, encoder.width).to(dist_info.device)
        self.optimizer = torch.optim.AdamW(self.projector.parameters(), lr=0.0, betas=tuple(betas), weight_decay=0.0)
        self.term_sum, self.term_n = torch.zeros((), device=dist_info.device), 0  # the term's mean since the last log line

    def on_at(self, step: int) -> bool:
        return self.settings.until is None or step < self.settings.until

    def loss_at(self, step: int):
        return self.loss if self.on_at(step) else None

    def target(self, x0: torch.Tensor, images: torch.Tensor | None = None) -> torch.Tensor:
        """The encoder's features (N, T, D) of the clean images behind normalized latents ``x0``: ``images`` where the
        shards store them, else ``x0`` decoded (for an SD3 VAE at 256 px, 0.72x the FLOPs of a PixArt-XL/2 training step)."""
        with torch.no_grad():
            _, _, h, w = x0.shape
            return self.encoder(self.decode(x0) if images is None else images, (h // self.patch_size, w // self.patch_size))

    def loss(self, module: nn.Module, ema: nn.Module, mb) -> torch.Tensor:
        self.student.armed = True
        try:
            plain = objective_loss(module, mb, self.objective)  # (N,), the block's output caught on the way
        finally:
            self.student.armed = False
        h, self.student.value = self.student.value, None
        term = alignment_loss(self.projector(h.float()), self.target(mb.x0, mb.images))  # (N,)
        self.term_sum += term.detach().mean()
        self.term_n += 1
        return plain + self.settings.weight * term

    def logged_term(self) -> float | None:
        """The mean of 1 - cos (before the weight) over the micro-batches since the last call and over ranks, for the
        log; None when the term was off. Every rank calls it (a collective)."""
        if self.term_n == 0:
            return None
        mean = all_reduce_mean(self.term_sum / self.term_n, self.dist_info).item()
        self.term_sum, self.term_n = torch.zeros_like(self.term_sum), 0
        return mean

    def update(self, step: int, lr: float, grad_clip: float, applied: bool) -> None:
        """After the model's step: the projector's gradient averaged over ranks, clipped, applied (unless the
        model's update was refused: a non-finite gradient), then cleared."""
        params = [p for p in self.projector.parameters() if p.grad is not None]
        if params and applied and self.on_at(step):
            average_in_place([p.grad for p in params], self.dist_info.world_size)
            nn.utils.clip_grad_norm_(params, grad_clip)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def identity(self) -> dict:
        """What the projector was trained for: a resumed run must match it."""
        s = self.settings
        return {"encoder": s.encoder, "subfolder": s.subfolder, "block": s.block, "projector_dim": s.projector_dim,
                "encoder_width": self.encoder.width}

    def state_dict(self) -> dict:
        return {"projector": self.projector.state_dict(), "optimizer": self.optimizer.state_dict(), "identity": self.identity()}

    def load_state_dict(self, state: dict) -> None:
        """A saved projector and its optimizer; ValueError naming what differs if it was trained for another setting."""
        saved, now = state.get("identity", {}), self.identity()
        changed = {k: (saved[k], now[k]) for k in now if k in saved and saved[k] != now[k]}
        if changed:
            raise ValueError(", ".join(f"{k}: {a!r} in the checkpoint, {b!r} now" for k, (a, b) in changed.items()))
        self.projector.load_state_dict(state["projector"])
        self.optimizer.load_state_dict(state["optimizer"])
