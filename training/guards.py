"""What keeps a long run alive or stops it cleanly: pre-emption signals and numerical guards.

Exit codes (documented in the README; the SLURM requeue logic relies on them):
    0   finished
    75  stopped by SIGTERM / SIGUSR1 after saving a checkpoint of the current step:
        requeue and run the same command again (resume=auto continues it)
    1   an error (bad config, bad data, too many non-finite steps, ...)
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from training import signals

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: "try again later"


class StopRequest:
    """First SIGTERM / SIGUSR1: finish the step, checkpoint, exit 75. A second one: exit at once.
    The handlers themselves are training/signals.py's, installed as early as the entry point can."""

    def install(self) -> "StopRequest":
        signals.catch()
        return self

    def uninstall(self) -> None:
        signals.release()

    @property
    def signum(self) -> int | None:
        return signals.received()

    def requested(self, distributed: bool) -> bool:
        """True on every rank if any rank got a stop signal (one tiny all-reduce when distributed)."""
        flag = torch.tensor(0.0 if self.signum is None else 1.0)
        if distributed:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


class NonFiniteGuard:
    """Skips steps whose gradient norm is not finite; too many in a row stop the run.

    The gradient norm is taken after DDP's all-reduce, so every rank makes the same call.
    """

    def __init__(self, max_consecutive: int):
        self.max_consecutive = max_consecutive
        self.skipped_total = 0
        self.consecutive = 0

    def check(self, grad_norm: float, step: int, last_checkpoint) -> bool:
        """True if the step may be applied; False to skip it. Raises after too many in a row."""
        if math.isfinite(grad_norm):
            self.consecutive = 0
            return True
        self.skipped_total += 1
        self.consecutive += 1
        if self.consecutive >= self.max_consecutive:
            raise FloatingPointError(
                f"{self.consecutive} consecutive steps had a non-finite loss or gradient (last at step {step}); stopping. "
                f"The last good checkpoint is {last_checkpoint or '(none saved yet)'}. Lower train.lr, check the data, "
                "or resume from an earlier checkpoint."
            )
        return False


class SpikeDetector:
    """Flags a loss far above its running average (logged, never acted on)."""

    def __init__(self, factor: float = 3.0, beta: float = 0.98):
        self.factor, self.beta, self.avg = factor, beta, None

    def update(self, loss: float) -> bool:
        if not math.isfinite(loss):
            return False
        spike = self.avg is not None and loss > self.factor * self.avg
        self.avg = loss if self.avg is None else self.beta * self.avg + (1 - self.beta) * loss
        return spike
