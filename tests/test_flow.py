import math

import pytest
import torch

from flow.rectified_flow import flow_loss, interpolate, loss_by_bin, sample_timesteps, shift_time, velocity_target
from flow.sampling import guided_velocity, sample, time_grid


def test_interpolation_endpoints_and_target():
    x0, eps = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    torch.testing.assert_close(interpolate(x0, eps, torch.zeros(3)), x0)  # t = 0 is data
    torch.testing.assert_close(interpolate(x0, eps, torch.ones(3)), eps)  # t = 1 is noise
    t = torch.tensor([0.25, 0.5, 0.75])
    xt = interpolate(x0, eps, t)
    torch.testing.assert_close(xt[1], 0.5 * x0[1] + 0.5 * eps[1])
    # v = dx_t/dt, checked by a finite difference
    h = 1e-3
    fd = (interpolate(x0, eps, t + h) - interpolate(x0, eps, t - h)) / (2 * h)
    torch.testing.assert_close(fd, velocity_target(x0, eps), rtol=1e-3, atol=1e-3)
    assert flow_loss(velocity_target(x0, eps), x0, eps).abs().max() == 0


def test_sd3_shift():
    t = torch.linspace(0, 1, 11)
    torch.testing.assert_close(shift_time(t, 1.0), t)
    s = shift_time(t, 3.0)
    assert s[0] == 0 and s[-1] == 1
    assert math.isclose(shift_time(torch.tensor(0.5), 3.0).item(), 0.75, rel_tol=1e-6)  # 3*.5 / (1 + 2*.5)
    assert torch.all(s[1:-1] > t[1:-1]) and torch.all(s.diff() > 0)  # more time at high noise, monotone


def test_logit_normal_timesteps():
    g = torch.Generator().manual_seed(0)
    t = sample_timesteps(200_000, mean=0.0, std=1.0, generator=g)
    assert 0 < t.min() and t.max() < 1
    assert abs(t.median().item() - 0.5) < 0.005
    t = sample_timesteps(200_000, mean=1.0, std=0.5, generator=g)
    assert abs(t.median().item() - torch.sigmoid(torch.tensor(1.0)).item()) < 0.005
    t = sample_timesteps(200_000, shift=3.0, generator=g)
    assert abs(t.median().item() - 0.75) < 0.005  # the shift moves the median exactly like the map


def test_time_grid():
    ts = time_grid(4, shift=1.0)
    torch.testing.assert_close(ts, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    with pytest.raises(ValueError, match="steps >= 1"):
        time_grid(0)


def test_euler_is_exact_on_a_straight_flow():
    # A flow whose data is one point: v(x, t) = (x - x0) / t moves on straight lines; Euler is exact.
    x0 = torch.randn(2, 3)
    noise = torch.randn(2, 3)
    out = sample(lambda x, t, c: (x - x0) / t[:, None], noise, cond=None, steps=3)
    torch.testing.assert_close(out, x0, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("solver,steps,tol", [("euler", 1000, 2e-3), ("midpoint", 50, 1e-4), ("rk4", 20, 1e-6), ("dopri5", 1, 1e-4)])
def test_solvers_on_a_known_field(solver, steps, tol):
    # dx/dt = -x integrated from t = 1 down to t = 0: x(0) = e * x(1).
    x1 = torch.randn(4, 2, dtype=torch.float64)
    out = sample(lambda x, t, c: -x, x1, cond=None, steps=steps, solver=solver)
    torch.testing.assert_close(out, math.e * x1, rtol=tol, atol=tol)


def test_euler_matches_its_closed_form():
    x1 = torch.randn(3, dtype=torch.float64)
    n = 10
    out = sample(lambda x, t, c: -x, x1, cond=None, steps=n)
    torch.testing.assert_close(out, x1 * (1 + 1 / n) ** n)


def test_cfg_is_one_batched_forward_with_the_guidance_formula():
    calls = []

    def fn(x, t, c):
        calls.append(x.shape[0])
        return x * 0 + c.view(-1, 1).float()

    v = guided_velocity(fn, torch.tensor([2, 2]), torch.tensor([5, 5]), cfg_scale=3.0)
    out = v(torch.zeros(2, 1), torch.tensor(0.5))
    assert calls == [4]  # conditional and unconditional in one forward
    torch.testing.assert_close(out, torch.full((2, 1), 5 + 3.0 * (2 - 5)))
    calls.clear()
    guided_velocity(fn, torch.tensor([2, 2]), torch.tensor([5, 5]), cfg_scale=1.0)(torch.zeros(2, 1), torch.tensor(0.5))
    assert calls == [2]  # scale 1: no unconditional pass


def test_loss_by_bin():
    per = torch.tensor([1.0, 2.0, 3.0, 4.0])
    t = torch.tensor([0.05, 0.07, 0.55, 0.999])
    sums, counts = loss_by_bin(per, t)
    assert sums[0] == 3.0 and counts[0] == 2 and sums[5] == 3.0 and sums[9] == 4.0 and counts.sum() == 4
