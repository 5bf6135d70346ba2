"""Run logging: a console progress bar (rank 0), metrics.jsonl, optional wandb."""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

log = logging.getLogger("flowdit")


def setup_console(is_main: bool) -> None:
    level = logging.INFO if is_main else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S", stream=sys.stdout, force=True)
    log.disabled = False  # Hydra's logging config disables loggers that existed before it ran


class RunLogger:
    """Writes metrics to ``metrics.jsonl`` (and wandb if enabled) and shows progress: a tqdm bar
    on a terminal, one log line per logging interval otherwise (SLURM and CI logs)."""

    def __init__(self, run_dir: Path, is_main: bool, total_steps: int, start_step: int, wandb_cfg=None, config=None):
        self.is_main = is_main
        self.path = run_dir / "metrics.jsonl"
        self.wandb = None
        self.bar = None
        if not is_main:
            return
        if wandb_cfg is not None and wandb_cfg.mode != "disabled":
            os.environ.setdefault("WANDB_DIR", str(run_dir))
            try:
                import wandb  # optional dependency
            except ImportError as e:
                raise RuntimeError(
                    f"train.wandb.mode={wandb_cfg.mode} needs wandb: pip install -e '.[wandb]' (or train.wandb.mode=disabled)"
                ) from e

            self.wandb = wandb.init(project=wandb_cfg.project, mode=wandb_cfg.mode, config=config, dir=str(run_dir), resume="allow")
        self.total, self.start_step, self.t0 = total_steps, start_step, time.time()
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
        rate = (step - self.start_step) / max(time.time() - self.t0, 1e-9)
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
