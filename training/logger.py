"""Run logging: a console progress bar (rank 0), metrics.jsonl, optional wandb; the loss statistics behind them."""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

import torch

from flow.rectified_flow import loss_by_bin
from training.config import ConfigError
from training.distributed import DistInfo, all_reduce_mean
from training.guards import SpikeDetector

log = logging.getLogger("flowdit")


def setup_console(is_main: bool) -> None:
    level = logging.INFO if is_main else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S", stream=sys.stdout, force=True)
    log.disabled = False  # Hydra's logging config disables loggers that existed before it ran


TRACKERS = ("none", "wandb", "tensorboard")


class RunLogger:
    """Writes metrics to ``metrics.jsonl`` and the tracker ``report_to`` names (wandb, TensorBoard: the
    numbers and the evaluation grids), and shows progress: a tqdm bar on a terminal, one log line per
    logging interval otherwise (SLURM and CI logs). ``close`` is the last call of a run."""

    def __init__(self, run_dir: Path, is_main: bool, total_steps: int, start_step: int, report_to: str = "none",
                 wandb_cfg=None, config=None):
        self.is_main = is_main
        self.path = run_dir / "metrics.jsonl"
        self.wandb = self.tensorboard = self.bar = None
        if not is_main:
            return
        if report_to not in TRACKERS:
            raise ConfigError(f"train.report_to={report_to!r}: expected one of {TRACKERS}")
        if report_to == "none" and wandb_cfg is not None and wandb_cfg.mode in ("offline", "online"):
            report_to = "wandb"  # train.wandb.mode=offline|online alone also asks for wandb
        if report_to == "wandb":
            self.wandb = _wandb(run_dir, wandb_cfg, config)
        elif report_to == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise RuntimeError("train.report_to=tensorboard needs tensorboard: pip install tensorboard") from e
            self.tensorboard = SummaryWriter(str(run_dir / "tensorboard"))
        self.total, self.start_step, self.t0 = total_steps, start_step, time.time()
        self._last = (start_step, self.t0)  # the previous progress line: the rate shown is the one since then
        if sys.stdout.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, dynamic_ncols=True, mininterval=1.0, desc="train", file=sys.stdout)

    def step(self, step: int, n: int, **postfix) -> None:
        """Advance the progress display by ``n`` steps to ``step``; ``postfix`` is shown beside it."""
        if not self.is_main:
            return
        if self.bar is not None:
            self.bar.update(n)
            self.bar.set_postfix(postfix, refresh=False)
            return
        now = time.time()
        last_step, last_time = self._last
        rate = (step - last_step) / max(now - last_time, 1e-9)  # the machine's speed now, not the run's average
        self._last = (step, now)
        eta = (self.total - step) / max(rate, 1e-9)
        extra = " ".join(f"{k} {v}" for k, v in postfix.items())
        log.info("step %d/%d %s | %.2f it/s | ETA %d:%02d", step, self.total, extra, rate, eta // 60, eta % 60)

    def log(self, step: int, metrics: dict) -> None:
        if not self.is_main:
            return
        record = {"step": step, "time": round(time.time(), 3), **metrics}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)
        if self.tensorboard is not None:
            for k, v in metrics.items():
                self.tensorboard.add_scalar(k, v, step)

    def images(self, step: int, pngs: dict[str, str]) -> None:
        """Sample grids (PNG paths by name) to the tracker."""
        if not self.is_main or not pngs:
            return
        if self.wandb is not None:
            import wandb

            self.wandb.log({k: wandb.Image(v) for k, v in pngs.items()}, step=step)
        if self.tensorboard is not None:
            import numpy as np
            from PIL import Image

            for k, v in pngs.items():
                self.tensorboard.add_image(k, np.asarray(Image.open(v).convert("RGB")), step, dataformats="HWC")

    def write(self, message: str) -> None:
        """A log line that does not break the progress bar."""
        if not self.is_main:
            return
        if self.bar is not None:
            self.bar.write(message, file=sys.stdout)
        else:
            log.info(message)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.wandb is not None:
            self.wandb.finish()
        if self.tensorboard is not None:
            self.tensorboard.close()
        self.wandb = self.tensorboard = self.bar = None


def _wandb(run_dir: Path, wandb_cfg, config):
    os.environ.setdefault("WANDB_DIR", str(run_dir))
    try:
        import wandb  # optional dependency
    except ImportError as e:
        raise RuntimeError("train.report_to=wandb needs wandb: pip install wandb (or train.report_to=none)") from e
    mode = wandb_cfg.mode if wandb_cfg is not None else None  # None: WANDB_MODE, else wandb's default (online)
    try:
        return wandb.init(project=wandb_cfg.project if wandb_cfg is not None else "flowdit", mode=mode, config=config,
                          dir=str(run_dir), resume="allow")
    except wandb.errors.UsageError as e:
        raise ConfigError(f"train.report_to=wandb: {e} To log without an account or a network, add "
                          "train.wandb.mode=offline (or set WANDB_MODE=offline) and upload later with `wandb sync`.") from e


class LossStats:
    """Loss sums between two log lines: the mean over finite micro-batches (a non-finite one is
    left out, and counted by the guard) and the mean by timestep bin, reduced across ranks."""

    def __init__(self, device: torch.device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.loss_sum, self.loss_n = torch.zeros((), device=self.device), torch.zeros((), device=self.device)
        self.bin_sums, self.bin_counts = torch.zeros(10, device=self.device), torch.zeros(10, device=self.device)

    def add(self, micro_loss: torch.Tensor, per_sample: torch.Tensor, t: torch.Tensor) -> None:
        """``micro_loss``: this micro-batch's mean loss; ``per_sample`` (N,) at timesteps ``t`` (N,)."""
        finite = torch.isfinite(micro_loss)
        self.loss_sum += torch.where(finite, micro_loss, 0.0)
        self.loss_n += finite
        s, c = loss_by_bin(per_sample, t)
        self.bin_sums += s
        self.bin_counts += c

    def reduce(self, dist_info: DistInfo) -> tuple[float, list[float]]:
        """(mean loss (NaN if every micro-batch was non-finite), mean loss per timestep bin); then reset."""
        mean_loss = all_reduce_mean(self.loss_sum / self.loss_n, dist_info).item()
        bins = (all_reduce_mean(self.bin_sums, dist_info) / all_reduce_mean(self.bin_counts, dist_info).clamp(min=1e-9)).tolist()
        self.reset()
        return mean_loss, bins


class Meter:
    """The training metrics between log lines: losses (``add``), then at each logging interval
    (``report``) one metrics.jsonl record, the progress display and a note on loss spikes."""

    def __init__(self, logger: RunLogger, dist_info: DistInfo, global_batch: int, spike_factor: float):
        self.logger, self.dist_info, self.global_batch = logger, dist_info, global_batch
        self.stats, self.spikes = LossStats(dist_info.device), SpikeDetector(spike_factor)
        self.steps, self.since, self.last_loss = 0, time.time(), None

    def add(self, losses) -> None:
        """One step's (mean loss, per-sample loss, t) per micro-batch (training/step.py StepOutput.losses)."""
        for loss, per_sample, t in losses:
            self.stats.add(loss, per_sample, t)
        self.steps += 1

    def report(self, step: int, show: tuple[str, ...] = (), **extra) -> float:
        """Log the interval's metrics (with ``extra``: lr, grad_norm, ...; those named in ``show`` on the console
        line too); returns its mean loss."""
        mean_loss, bins = self.stats.reduce(self.dist_info)
        it_s = self.steps / max(time.time() - self.since, 1e-9)
        metrics = {"loss": mean_loss, **extra, "it_s": it_s, "img_s": it_s * self.global_batch,
                   **{f"loss_bin/{i}": b for i, b in enumerate(bins)}}
        self.logger.log(step, metrics)
        self.logger.step(step, self.steps, loss=f"{mean_loss:.4f}", **{k: f"{extra[k]:.4f}" for k in show},
                         img_s=f"{metrics['img_s']:.0f}")
        if self.spikes.update(mean_loss):
            self.logger.write(f"step {step}: loss spike {mean_loss:.4f} (running average {self.spikes.avg:.4f})")
        self.steps, self.since, self.last_loss = 0, time.time(), mean_loss
        return mean_loss
