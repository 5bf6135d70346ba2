"""Latent consistency models on the flow ODE: the consistency function, its teacher target, and
multi-step consistency sampling.

A consistency model maps any point of an ODE trajectory to the trajectory's start (data). With
a velocity model v(x, t) the predicted data is x0_hat = x_t - t v, and LCM's parametrization

    f(x_t, t) = c_skip(t) x_t + c_out(t) x0_hat,   c_skip(t) = s^2 / ((k t)^2 + s^2),  c_out(t) = k t / sqrt((k t)^2 + s^2)

(s = sigma_data 0.5, k = 1000 x timestep_scaling 10, on LCM's discrete timesteps t x 1000) meets the
boundary condition f(x, 0) = x exactly whatever the network says, and is x0_hat almost everywhere else.

Distillation (training/distill.py) pulls f(x_{t_n}, t_n) toward the target network's
f(x_hat_{t_m}, t_m), where x_hat_{t_m} is one step of the guided teacher from t_n to the next point
t_m of a coarse grid (the skipped steps). Sampling (``consistency_sample``): f at the first grid
point, then for each next point re-noise the prediction to that time and apply f again.
"""
from __future__ import annotations

from typing import Callable

import torch

from flow.rectified_flow import interpolate

SIGMA_DATA = 0.5
TIMESTEP_SCALING = 10.0


def boundary_coefficients(t: torch.Tensor, sigma_data: float = SIGMA_DATA, timestep_scaling: float = TIMESTEP_SCALING):
    """(c_skip, c_out) at model times t in [0, 1]: (1, 0) at t = 0, about (0, 1) from t = 0.001 on."""
    scaled = t.double() * 1000.0 * timestep_scaling
    c_skip = sigma_data**2 / (scaled**2 + sigma_data**2)
    c_out = scaled / (scaled**2 + sigma_data**2).sqrt()
    return c_skip, c_out


def consistency_function(x: torch.Tensor, t: torch.Tensor, velocity: torch.Tensor) -> torch.Tensor:
    """f(x_t, t) from a velocity prediction; t a scalar or (N,) tensor."""
    t = t.expand(x.shape[0]) if t.dim() == 0 else t
    c_skip, c_out = (c.to(x.dtype).view(-1, *([1] * (x.dim() - 1))) for c in boundary_coefficients(t))
    tt = t.to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
    return c_skip * x + c_out * (x - tt * velocity)


def teacher_grid(steps: int, shift: float = 1.0, device=None) -> torch.Tensor:
    """The coarse grid the teacher steps on, (steps + 1,) times from 1 to 0 (the sampler's shifted grid)."""
    from flow.sampling import time_grid

    return time_grid(steps, shift, device or "cpu")


def pseudo_huber(a: torch.Tensor, b: torch.Tensor, c: float) -> torch.Tensor:
    """Per-sample pseudo-Huber distance (N,) of LCM: sqrt(mean (a - b)^2 + c^2) - c; MSE-like near 0, L2 far off."""
    return ((a.float() - b.float()).pow(2).flatten(1).mean(1) + c * c).sqrt() - c


@torch.no_grad()
def consistency_sample(velocity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], noise: torch.Tensor, steps: int,
                       shift: float = 1.0, seed: int = 0) -> torch.Tensor:
    """Multi-step consistency sampling: x0 = f(x, t_i) at each point t_0 = 1 > t_1 > ... of the shifted grid of
    ``steps`` steps; between points the prediction is noised again to t_{i+1} with fresh noise (a CPU
    generator seeded from ``seed``, so the images do not depend on the device). ``velocity(x, t)``:
    the model with its condition (flow/sampling.py ``guided_velocity``); a distilled student takes its
    guidance scale as an input and needs no unconditional pass."""
    ts = teacher_grid(steps, shift, noise.device).to(noise.dtype)
    gen = torch.Generator().manual_seed(seed + 1)  # the initial noise uses ``seed`` itself
    x = noise
    for i in range(steps):
        t = ts[i].expand(x.shape[0])
        x0 = consistency_function(x, t, velocity(x, t))
        if i + 1 < steps:
            fresh = torch.randn(x.shape, generator=gen).to(device=x.device, dtype=x.dtype)
            x = interpolate(x0, fresh, ts[i + 1].expand(x.shape[0]))
    return x0
