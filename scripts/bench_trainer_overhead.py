"""What the trainer costs on top of the bare model step (the target: at most 5%).

    python scripts/bench_trainer_overhead.py                  # the stage-1 demo config, ~5 min on 2 CPU cores
    python scripts/bench_trainer_overhead.py --experiment demo_stage2 --stage stage2 --pairs 5

Bare step: the trainer's own training step (training/step.py train_step: forward, flow loss,
backward, gradient clipping and the trainer's AdamW) on one fixed batch of the same shape, model
and optimizer settings, without a data loader, EMA or logging: what any implementation pays.
Trainer step: the real trainer (`train_<stage>.py experiment=...` run in this process) with
everything it does per step: reading shards, condition dropout, timestep and noise draws,
loss-by-timestep bins, the non-finite guard, EMA, logging every 25 steps (checkpoints and
evaluations off; the final save comes after the timed window). Its time per step is taken
between two metrics.jsonl time stamps, after 25 warm-up steps. Interleaved pairs; the
median ratio is reported. Prints a table, writes JSON (default bench/trainer_overhead.json).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
WARMUP = 25

from scripts.results import write_json  # noqa: E402
from training.config import compose  # noqa: E402
from models.cli import HelpFormatter  # noqa: E402


def bare_step_fn(cfg):
    """The model step of `cfg` on a fixed batch, with the trainer's own model, step and optimizer
    (text stages: embeddings of the width and length the prepared shards' manifest records)."""
    import torch

    from data.shards import read_manifest
    from inference.conditioning import ClassConditioning, TextConditioning
    from models.autoencoder import load_autoencoder
    from models.presets import build_model
    from training.optim import make_optimizer
    from training.setup import build_model_config
    from training.step import Local, MicroBatch, train_step

    torch.manual_seed(0)
    ae = load_autoencoder(cfg.data.autoencoder, cfg.data.autoencoder_subfolder)
    n = cfg.train.global_batch_size
    if cfg.stage.conditioning == "text":
        encoder = read_manifest(cfg.data.path)["text_encoder"]
        width, tokens = int(encoder["width"]), int(encoder["max_length"])
        conditioning = TextConditioning(encoder["name"], tokens, width)
        cond = {"encoder_hidden_states": torch.randn(n, tokens, width), "encoder_attention_mask": torch.ones(n, tokens, dtype=torch.bool)}
    else:
        conditioning = ClassConditioning(cfg.data.num_classes)
        cond = {"class_labels": torch.randint(0, cfg.data.num_classes, (n,))}
    mcfg = build_model_config(cfg, ae, conditioning)
    model = build_model(cfg.model.family, mcfg).train()
    opt = make_optimizer(model, cfg.train.lr, cfg.train.weight_decay, cfg.train.betas)
    x0 = torch.randn(n, mcfg.in_channels, mcfg.input_size, mcfg.input_size)
    parallel = Local(model)
    return lambda: train_step(parallel, opt, [MicroBatch.draw(x0, cond)], 1, grad_clip=cfg.train.grad_clip)


def trainer_step_s(stage: str, overrides: list[str], steps: int) -> float:
    from training.trainer import train

    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        cfg = compose(stage, [*overrides, f"run_dir={run_dir}", f"train.max_steps={WARMUP + steps}", "train.log_every=25",
                              "train.sample_every=0", "train.checkpoint_every=0", f"train.warmup_steps={WARMUP}"])
        train(cfg)
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        stamps = {r["step"]: r["time"] for r in rows if "time" in r and "loss" in r}
        return (stamps[WARMUP + steps] - stamps[WARMUP]) / steps


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--stage", default="stage1")
    ap.add_argument("--experiment", default="demo")
    ap.add_argument("--steps", type=int, default=100, help="timed steps per measurement (a multiple of 25)")
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--out", default="bench/trainer_overhead.json")
    ap.add_argument("overrides", nargs="*", help="more Hydra overrides for the trainer (and the bare step's config)")
    args = ap.parse_args(argv)
    if args.steps % 25:
        ap.error("--steps must be a multiple of 25 (the trainer logs every 25 steps)")

    import torch

    overrides = [f"experiment={args.experiment}", *args.overrides]
    cfg = compose(args.stage, overrides)
    trainer_step_s(args.stage, overrides, 25)  # builds the data on first use (the bare step reads its manifest); warms caches
    step = bare_step_fn(cfg)
    for _ in range(WARMUP):
        step()
    pairs = []
    for i in range(args.pairs):
        t = time.perf_counter()
        for _ in range(args.steps):
            step()
        bare = (time.perf_counter() - t) / args.steps
        full = trainer_step_s(args.stage, overrides, args.steps)
        pairs.append({"bare_step_s": bare, "trainer_step_s": full, "overhead": full / bare - 1})
        print(f"pair {i}: bare {bare * 1e3:.1f} ms, trainer {full * 1e3:.1f} ms, overhead {full / bare - 1:+.1%}", flush=True)
    overhead = statistics.median(p["overhead"] for p in pairs)
    record = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads",
        "stage": args.stage, "experiment": args.experiment, "overrides": args.overrides,
        "batch": cfg.train.global_batch_size, "timed_steps": args.steps, "pairs": pairs, "median_overhead": overhead,
    }
    print("\n| measure | value |\n|---|---|")
    print(f"| bare model step (median) | {statistics.median(p['bare_step_s'] for p in pairs) * 1e3:.1f} ms |")
    print(f"| full trainer step (median) | {statistics.median(p['trainer_step_s'] for p in pairs) * 1e3:.1f} ms |")
    print(f"| trainer overhead (median of {args.pairs} pairs) | {overhead:+.1%} |")
    return write_json(record, args.out)


if __name__ == "__main__":
    main()
