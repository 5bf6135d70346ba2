"""Sampling: integrate dx/dt = v from t = 1 (noise) to t = 0 (data), with CFG.

``velocity_fn(x, t, cond)`` is any model call returning v for a batch. Classifier-free
guidance runs the conditional and unconditional halves in one batched forward:
    v = v_uncond + scale * (v_cond - v_uncond).
The time grid is the same SD3 shift as training uses.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from flow.rectified_flow import shift_time

VelocityFn = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]
ODE_SOLVERS = ("euler", "midpoint", "rk4", "dopri5", "heun3", "bosh3")
# every solver a sampler offers: the ODE's, diffusers' DPM-Solver++ and DDIM schedulers (flow/objectives.py), and
# multi-step consistency sampling for distilled few-step students (flow/consistency.py)
SOLVERS = ODE_SOLVERS + ("dpm++", "ddim", "lcm")
# model evaluations per step (dopri5 adapts its steps: at least this many): what a request costs, and progress
EVALS_PER_STEP = {"euler": 1, "midpoint": 2, "rk4": 4, "dopri5": 6, "heun3": 3, "bosh3": 3, "dpm++": 1, "ddim": 1, "lcm": 1}


def time_grid(steps: int, shift: float = 1.0, device: torch.device | str = "cpu") -> torch.Tensor:
    """(steps + 1,) times from 1 down to 0 on the shifted grid."""
    if steps < 1:
        raise ValueError(f"sampling needs steps >= 1, got {steps}")
    return shift_time(torch.linspace(1.0, 0.0, steps + 1, device=device), shift)


def concat_conditions(a: Any, b: Any) -> Any:
    """Batch-concatenate two conditions: tensors, or dicts of tensors (text + mask). What is not a
    tensor (None, a ControlNet's conditioning scale) is the same for both halves and kept as it is."""
    if isinstance(a, dict):
        return {k: concat_conditions(a[k], b[k]) for k in a}
    if not torch.is_tensor(a):
        return a
    return torch.cat([a, b], dim=0)


def guided_velocity(velocity_fn: VelocityFn, cond: Any, uncond: Any, cfg_scale: float,
                    prepare: Callable[[Any], Any] | None = None) -> Callable:
    """v(x, t) with classifier-free guidance; t is a scalar or (N,) tensor. ``prepare`` maps the
    (batched) condition once to what ``velocity_fn`` takes at every step (a text cache, say)."""
    use_cfg = uncond is not None and cfg_scale != 1.0
    both = concat_conditions(cond, uncond) if use_cfg else cond
    if prepare is not None:
        both = prepare(both)

    def v(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        tt = t.expand(x.shape[0]) if t.dim() == 0 else t
        if not use_cfg:
            return velocity_fn(x, tt, both)
        out = velocity_fn(torch.cat([x, x]), torch.cat([tt, tt]), both)
        v_cond, v_uncond = out.chunk(2)
        return v_uncond + cfg_scale * (v_cond - v_uncond)

    return v


@torch.no_grad()
def sample(
    velocity_fn: VelocityFn,
    noise: torch.Tensor,
    cond: Any,
    uncond: Any = None,
    cfg_scale: float = 1.0,
    steps: int = 20,
    shift: float = 1.0,
    solver: str = "euler",
    return_trajectory: bool = False,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    prepare: Callable[[Any], Any] | None = None,
):
    """Solve the flow ODE from ``noise`` (t = 1) to data (t = 0).

    Returns x0 (N, C, H, W); with ``return_trajectory`` also the list of
    predicted clean images x0_hat = x_t - t v at each Euler step (for the
    denoising strip in the app; Euler only). ``prepare``: see ``guided_velocity``.
    """
    v = guided_velocity(velocity_fn, cond, uncond, cfg_scale, prepare)
    ts = time_grid(steps, shift, noise.device).to(noise.dtype)
    if solver == "euler":
        x, traj = noise, []
        for i in range(steps):
            t, t_next = ts[i], ts[i + 1]
            vel = v(x, t)
            if return_trajectory:
                traj.append(x - t * vel)
            x = x + (t_next - t) * vel
        return (x, traj) if return_trajectory else x
    if solver not in ODE_SOLVERS:
        raise ValueError(f"unknown ODE solver {solver!r}; expected one of {ODE_SOLVERS} (dpm++ and ddim: sample_with_scheduler)")
    if return_trajectory:
        raise ValueError("return_trajectory needs solver='euler'")
    from torchdiffeq import odeint  # imported on use: only these solvers need it

    if solver in ("dopri5", "bosh3"):  # adaptive: the grid only sets where output is reported
        out = odeint(lambda t, x: v(x, t), noise, ts[[0, -1]], method=solver, rtol=rtol, atol=atol)
    else:  # fixed-step: take exactly the shifted grid's steps
        out = odeint(lambda t, x: v(x, t), noise, ts, method=solver)
    return out[-1]


@torch.no_grad()
def sample_with_scheduler(
    model_fn: VelocityFn,
    noise: torch.Tensor,
    cond: Any,
    scheduler,
    steps: int,
    uncond: Any = None,
    cfg_scale: float = 1.0,
    time_scale: float = 1000.0,
    prepare: Callable[[Any], Any] | None = None,
) -> torch.Tensor:
    """Sample with a diffusers scheduler (DPM-Solver++, DDIM: flow/objectives.py ``Objective.scheduler``),
    the loop ``PixArtAlphaPipeline`` runs: the scheduler's integer timesteps, the model called at
    t = timestep / ``time_scale`` (our models take t in [0, 1]), guidance on the prediction."""
    f = guided_velocity(model_fn, cond, uncond, cfg_scale, prepare)
    scheduler.set_timesteps(steps, device=noise.device)
    x = noise * scheduler.init_noise_sigma
    for timestep in scheduler.timesteps:
        t = (timestep.to(torch.float32) / time_scale).to(noise.device)
        out = f(scheduler.scale_model_input(x, timestep), t)
        x = scheduler.step(out, timestep, x, return_dict=False)[0]
    return x
