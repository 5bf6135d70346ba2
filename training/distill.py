"""Few-step distillation, LCM-style, on the flow ODE (flow/consistency.py): the loss a distillation run
(train_distill.py) trains its student with, in place of the flow loss.

For each sample: a point t_n of the teacher's coarse grid (``train.distill.teacher_steps`` steps of
the sampler's shifted grid: the skipped steps) and a guidance scale w ~ U[w_min, w_max]. The teacher
(the frozen init checkpoint) takes one guided Euler step (v_u + w (v_c - v_u), DDIM's step on a
flow) from x_{t_n} to the next grid point t_m; the student's consistency function at (x_{t_n}, t_n, w)
is pulled toward the target network's at (x_hat_{t_m}, t_m, w), pseudo-Huber. The target network is
the run's EMA of the student (``train.ema_decay``: LCM's 0.95), which the trainer keeps anyway.
The student (``model.guidance_embed``) takes w as an input, so its samples need no
unconditional pass. Without it (LCM-LoRA: adapters on a frozen copy of the teacher, ``train.lora``)
the student learns the guided trajectories for the whole w range without being told w, and samples
without guidance.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from flow.consistency import consistency_function, pseudo_huber, teacher_grid
from flow.rectified_flow import interpolate
from flow.sampling import concat_conditions
from inference.pipeline import call_model

DRAWS = 2  # uniform numbers per sample a distillation step needs from the step's random stream: grid point, w


@dataclass
class DistillSettings:
    teacher_steps: int = 32
    w_min: float = 1.0
    w_max: float = 6.0
    huber_c: float = 0.001

    @classmethod
    def from_config(cls, node) -> "DistillSettings":
        return cls(**{k: node[k] for k in ("teacher_steps", "w_min", "w_max", "huber_c") if node is not None and k in node})


class ConsistencyDistillation:
    """The distillation loss of one run: ``loss(student, target, micro_batch)`` -> per-sample loss (N,)."""

    def __init__(self, teacher: nn.Module, null_condition, settings: DistillSettings, shift: float = 1.0, takes_w: bool = True):
        """``takes_w``: the student has a guidance input (``model.guidance_embed``); LCM-LoRA's has none."""
        self.teacher = teacher.eval().requires_grad_(False)  # the init checkpoint, frozen for the whole run
        self.null_condition, self.settings, self.takes_w = null_condition, settings, takes_w
        self.grid = teacher_grid(settings.teacher_steps, shift)

    def guidance(self, u: torch.Tensor) -> torch.Tensor:
        s = self.settings
        return s.w_min + (s.w_max - s.w_min) * u

    def loss(self, student: nn.Module, target: nn.Module, mb) -> torch.Tensor:
        x0, noise = mb.x0, mb.noise
        n, steps = x0.shape[0], self.settings.teacher_steps
        index = (mb.extra[:, 0] * steps).long().clamp(max=steps - 1)
        grid = self.grid.to(x0.device)
        t_n, t_m = grid[index], grid[index + 1]  # from t_n one coarse step toward the data
        w = self.guidance(mb.extra[:, 1])
        x_n = interpolate(x0, noise, t_n)
        cond = {**mb.cond, "guidance": w} if self.takes_w else mb.cond  # LCM-LoRA's student is not told w
        f_student = consistency_function(x_n, t_n, call_model(student, x_n, t_n, cond))
        with torch.no_grad():
            both = concat_conditions(mb.cond, self.null_condition(n, x0.device))
            v_c, v_u = call_model(self.teacher, torch.cat([x_n, x_n]), torch.cat([t_n, t_n]), both).float().chunk(2)
            v = v_u + w.view(-1, *([1] * (x0.dim() - 1))) * (v_c - v_u)
            x_m = x_n + (t_m - t_n).view(-1, *([1] * (x0.dim() - 1))) * v
            f_target = consistency_function(x_m, t_m, call_model(target, x_m, t_m, cond).float())
        return pseudo_huber(f_student, f_target, self.settings.huber_c)
