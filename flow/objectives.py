"""What a model is trained to predict, and the samplers that read it: one object per checkpoint.

``flow`` (the default): rectified flow (flow/rectified_flow.py), the model predicts the velocity
noise - x0 at continuous t in [0, 1].

``epsilon``: DDPM noise prediction on a discrete schedule, what PixArt-α and PixArt-Σ were trained
with (1000 steps, betas linear from 1e-4 to 0.02): x_k = sqrt(ab_k) x0 + sqrt(1 - ab_k) noise for
an integer step k drawn uniformly, and the model sees t = k / 1000 (it multiplies t by 1000, so
it gets the integer timestep diffusers feeds it).

Learned variance: PixArt's released models output 2C channels for C latent channels, the noise
and improved DDPM's variance interpolation. As PixArt's own LoRA and fine-tuning scripts for
diffusers do, fine-tuning trains the first C (the noise) by MSE and leaves the variance channels
out of the loss, and samplers read the first C (as ``PixArtAlphaPipeline`` does): DPM-Solver++ and
DDIM do not use a variance.

Samplers: ``flow`` integrates the ODE (flow/sampling.py) or uses DPM-Solver++ on flow sigmas;
``epsilon`` uses diffusers' DPM-Solver++ or DDIM schedulers (``scheduler``).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from flow.rectified_flow import flow_loss, interpolate, per_sample_mse, sample_timesteps

KINDS = ("flow", "epsilon")
SCHEDULER_SOLVERS = ("dpm++", "ddim")  # through diffusers' schedulers
PIXART_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear")


@dataclass(frozen=True)
class Objective:
    """kind: ``flow`` or ``epsilon``; the rest is the DDPM schedule of ``epsilon`` (PixArt's by default)."""

    kind: str = "flow"
    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"objective {self.kind!r}: expected one of {KINDS} (flow: rectified flow; epsilon: DDPM noise prediction)")

    @classmethod
    def from_meta(cls, meta: dict | None) -> "Objective":
        """A checkpoint's ``meta["objective"]``; absent in checkpoints that predate it: flow."""
        return cls(**(meta or {}))

    def to_meta(self) -> dict:
        return {"kind": self.kind} if self.kind == "flow" else asdict(self)

    # ------------------------------------------------------------ training
    def alphas_cumprod(self, device=None) -> torch.Tensor:
        """(T,) float64, as diffusers' DDPM schedulers compute it."""
        t = self.num_train_timesteps
        if self.beta_schedule == "linear":
            betas = torch.linspace(self.beta_start, self.beta_end, t, dtype=torch.float64)
        elif self.beta_schedule == "scaled_linear":
            betas = torch.linspace(self.beta_start**0.5, self.beta_end**0.5, t, dtype=torch.float64) ** 2
        else:
            raise ValueError(f"beta_schedule {self.beta_schedule!r}: expected linear or scaled_linear")
        return torch.cumprod(1.0 - betas, 0).to(device)

    def draw_t(self, n: int, logit_mean: float, logit_std: float, shift: float, gen: torch.Generator | None, device) -> torch.Tensor:
        """(n,) model times: flow's logit-normal (shifted); epsilon's uniform integer step / T."""
        if self.kind == "flow":
            return sample_timesteps(n, logit_mean, logit_std, shift, gen, device)
        k = torch.randint(0, self.num_train_timesteps, (n,), generator=gen, device=device)
        return k.float() / self.num_train_timesteps

    def noisy(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The model's input at time t."""
        if self.kind == "flow":
            return interpolate(x0, noise, t)
        k = (t * self.num_train_timesteps).round().long()
        ab = self.alphas_cumprod(x0.device)[k].view(-1, *([1] * (x0.dim() - 1)))
        return (ab.sqrt() * x0.double() + (1 - ab).sqrt() * noise.double()).to(x0.dtype)

    def loss(self, pred: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """Per-sample MSE, (N,). A prediction with 2C channels (learned variance) is scored on its first C.
        ``weight`` (N, 1, H, W) of 0/1: the mean over the pixels where it is 1 (a masked step's kept tokens)."""
        pred = prediction(pred, x0.shape[1])
        if self.kind == "flow":
            return flow_loss(pred, x0, noise, weight)
        return per_sample_mse(pred, noise, weight)

    # ------------------------------------------------------------ sampling
    def scheduler(self, solver: str, shift: float = 1.0):
        """The diffusers scheduler for ``solver`` (dpm++ or ddim), configured for this objective."""
        from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

        if solver not in SCHEDULER_SOLVERS:
            raise ValueError(f"solver {solver!r} is not a scheduler: expected one of {SCHEDULER_SOLVERS}")
        if self.kind == "flow":
            self.check_solver(solver)
            return DPMSolverMultistepScheduler(num_train_timesteps=self.num_train_timesteps, use_flow_sigmas=True,
                                               prediction_type="flow_prediction", flow_shift=shift, solver_order=2)
        schedule = dict(num_train_timesteps=self.num_train_timesteps, beta_start=self.beta_start, beta_end=self.beta_end,
                        beta_schedule=self.beta_schedule, prediction_type="epsilon")
        if solver == "ddim":
            return DDIMScheduler(**schedule, clip_sample=False, set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading")
        return DPMSolverMultistepScheduler(**schedule, solver_order=2, algorithm_type="dpmsolver++", lower_order_final=True)

    def check_solver(self, solver: str) -> None:
        """ValueError, saying which solvers fit, when ``solver`` cannot sample this objective."""
        if self.kind == "epsilon" and solver not in SCHEDULER_SOLVERS:
            raise ValueError(f"this checkpoint predicts DDPM noise (epsilon): sample it with solver dpm++ or ddim, not {solver!r}")
        if solver == "lcm" and self.kind != "flow":
            raise ValueError("lcm (consistency sampling) is for flow models distilled with train_distill.py")
        if self.kind == "flow" and solver == "ddim":
            raise ValueError("ddim is for epsilon models; this checkpoint is a flow: use euler, another ODE solver, or dpm++")


FLOW = Objective()


def prediction(out: torch.Tensor, channels: int) -> torch.Tensor:
    """The prediction in a model's output: all of it, or the first ``channels`` of a learned-variance output."""
    if out.shape[1] == 2 * channels:
        return out[:, :channels]
    return out
