"""Rectified flow, the SD3 / diffusers FlowMatchEuler convention.

t in [0, 1]; t = 0 is data, t = 1 is noise:
    x_t = (1 - t) * x0 + t * noise,        v = dx_t/dt = noise - x0.
The model predicts v. Training draws t from a logit-normal(m, s) distribution
and applies SD3's resolution shift t' = a t / (1 + (a - 1) t); sampling
integrates dx/dt = v from t = 1 to t = 0 on the same shifted time grid.
"""
from __future__ import annotations

import torch


def shift_time(t: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3 time shift: a > 1 spends more time at high noise. a = 1 is the identity."""
    if shift == 1.0:
        return t
    return shift * t / (1 + (shift - 1) * t)


def sample_timesteps(
    n: int,
    mean: float = 0.0,
    std: float = 1.0,
    shift: float = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """(n,) training times: sigmoid(N(mean, std)), then shifted."""
    u = torch.randn(n, generator=generator, device=device) * std + mean
    return shift_time(torch.sigmoid(u), shift)


def interpolate(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - t) x0 + t noise, with t (N,) broadcast over the remaining dims."""
    t = t.view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
    return (1 - t) * x0 + t * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return noise - x0


def flow_loss(pred: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample MSE between predicted and true velocity, (N,); ``weight`` as in :func:`per_sample_mse`."""
    return per_sample_mse(pred, velocity_target(x0, noise), weight)


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """(N,) mean squared error of each sample; ``weight`` (N, 1, H, W) of 0/1: the mean over the pixels
    where it is 1 (a masked step's kept tokens)."""
    err = (pred.float() - target.float()).pow(2)
    if weight is None:
        return err.flatten(1).mean(1)
    return (err * weight).flatten(1).sum(1) / (weight.flatten(1).sum(1) * err.shape[1])


def loss_by_bin(per_sample: torch.Tensor, t: torch.Tensor, num_bins: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum and count of the per-sample loss in ``num_bins`` equal bins of t (minRF's lossbin).

    Returns (sums (num_bins,), counts (num_bins,)); accumulate both over steps and divide.
    """
    idx = (t.detach() * num_bins).long().clamp_(0, num_bins - 1)
    sums = torch.zeros(num_bins, device=t.device).index_add_(0, idx, per_sample.detach().float())
    counts = torch.zeros(num_bins, device=t.device).index_add_(0, idx, torch.ones_like(per_sample, dtype=torch.float))
    return sums, counts
