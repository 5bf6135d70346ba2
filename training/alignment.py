"""Self-representation alignment (SRA, Jiang et al. 2025): the model's own EMA as the teacher of its
shallow layers, with no external encoder.

At each training step the trained model's output of a shallow block (``student_block``) at the
sample's time t is pulled, token by token, toward the EMA model's output of a deeper block
(``teacher_block``) on the same image and noise at the less noisy time t - ``gap``: a term
``weight * (1 - cos)`` added to the objective's loss. Deeper layers at lower noise hold cleaner
features; aligning the early layers to them is what REPA does with DINOv2, here without one.
Both blocks have the model's width, so the features are compared directly (no projection head:
nothing is added to the model or its checkpoints). As HASTE argues for alignment terms, the
help is early: the term is switched off at step ``until``, after which a step costs what a plain
one does. The teacher's forward stops at its block.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from flow.objectives import Objective
from inference.pipeline import call_model
from training.step import objective_loss


@dataclass(frozen=True)
class AlignSettings:
    weight: float = 0.0  # 0 = off
    student_block: int = 1  # its output, of the model being trained
    teacher_block: int = 3  # its output, of the EMA model
    gap: float = 0.1  # the teacher sees t - gap (clamped at 0): less noise
    until: int | None = None  # the step the term is switched off at; None = never

    @classmethod
    def from_config(cls, node) -> "AlignSettings":
        keys = ("weight", "student_block", "teacher_block", "gap", "until")
        return cls(**{k: node[k] for k in keys if node is not None and k in node})

    def check(self, depth: int) -> "AlignSettings":
        if not 0 <= self.student_block < self.teacher_block < depth:
            raise ValueError(f"student_block={self.student_block}, teacher_block={self.teacher_block}: need "
                             f"0 <= student_block < teacher_block < depth ({depth}), the teacher deeper")
        if self.weight < 0 or not 0 <= self.gap < 1:
            raise ValueError(f"weight {self.weight} / gap {self.gap}: expected weight >= 0 and 0 <= gap < 1")
        return self


def alignment_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Per-sample 1 - cosine similarity of (N, T, D) features, averaged over tokens: (N,); zero where
    they point the same way, whatever their lengths."""
    return 1.0 - F.cosine_similarity(student.float(), teacher.float(), dim=-1).mean(dim=1)


class _Enough(Exception):
    """Raised by the teacher's hook: the blocks after the teacher block are not needed."""


class BlockOutput:
    """Catches one block's image-token output (a joint block returns (image, text): the first) while armed."""

    def __init__(self, block: nn.Module, stop: bool = False):
        self.value: torch.Tensor | None = None
        self.stop = stop
        block.register_forward_hook(self._hook)
        self.armed = False

    def _hook(self, module, args, output):
        if self.armed:
            self.value = output[0] if isinstance(output, tuple) else output
            if self.stop:
                raise _Enough


class SelfAlignment:
    """The loss of a run with ``train.align``: ``loss_at(step)`` gives the step's ``loss_fn`` for
    training/step.py (the objective's per-sample loss plus the weighted alignment term), or None once
    the term is off (the step's own objective, at a plain step's cost)."""

    def __init__(self, model: nn.Module, ema: nn.Module, settings: AlignSettings, objective: Objective):
        self.settings, self.objective = settings, objective
        self.student = BlockOutput(model.blocks[settings.student_block])
        self.teacher = BlockOutput(ema.blocks[settings.teacher_block], stop=True)

    def loss_at(self, step: int):
        s = self.settings
        if s.weight == 0 or (s.until is not None and step >= s.until):
            return None
        return self.loss

    def loss(self, module: nn.Module, ema: nn.Module, mb) -> torch.Tensor:
        obj = self.objective
        self.student.armed = True
        try:
            plain = objective_loss(module, mb, obj)  # (N,), the student block's output caught on the way
        finally:
            self.student.armed = False
        h_student, self.student.value = self.student.value, None
        t_teacher = (mb.t - self.settings.gap).clamp(min=0.0)
        self.teacher.armed = True
        try:
            with torch.no_grad():
                call_model(ema, obj.noisy(mb.x0, mb.noise, t_teacher), t_teacher, mb.cond)
        except _Enough:
            pass
        finally:
            self.teacher.armed = False
        h_teacher, self.teacher.value = self.teacher.value, None
        return plain + self.settings.weight * alignment_loss(h_student, h_teacher)
