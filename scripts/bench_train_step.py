"""Benchmark the bare training step: img/s, model FLOP/s, and FLOP/s relative to a large GEMM.

    python scripts/bench_train_step.py                        # the demo model on 32x32 pixels
    python scripts/bench_train_step.py --preset S/2 --channels 16 --input-size 32 --batch 8

The step is the trainer's own (training/step.py train_step, with gradient clipping at 1.0).
Prints a table and writes JSON (default bench/train_step.json). Model FLOPs are
counted by torch's FlopCounterMode on one forward + backward (matmuls and
attention); the GEMM reference is a square fp32 matmul timed in the same run,
so the ratio says how close the model step gets to what this machine's matmul
can do, independent of the machine.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scripts.results import write_json  # noqa: E402
from models.cli import HelpFormatter  # noqa: E402


def gemm_flops(n: int, repeats: int, device) -> float:
    import torch

    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    for _ in range(2):
        a @ b
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(times)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--family", default="ccdit")
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--input-size", type=int, default=32, help="latent side")
    ap.add_argument("--channels", type=int, default=3, help="latent channels")
    ap.add_argument("--num-classes", type=int, default=12)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20, help="timed steps")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--gemm", type=int, default=2048, help="side of the reference GEMM")
    ap.add_argument("--out", default="bench/train_step.json")
    args = ap.parse_args(argv)

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from models.presets import build_model, count_parameters, model_config
    from training.step import Local, MicroBatch, train_step

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    cfg = model_config(args.family, args.preset, input_size=args.input_size, in_channels=args.channels, num_classes=args.num_classes)
    model = build_model(args.family, cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x0 = torch.randn(args.batch, args.channels, args.input_size, args.input_size, device=device)
    cond = {"class_labels": torch.randint(0, args.num_classes + 1, (args.batch,), device=device)}
    parallel = Local(model)

    def step():  # the trainer's step (training/step.py): draws, forward, loss, backward, clipping, AdamW
        train_step(parallel, opt, [MicroBatch.draw(x0, cond)], 1, grad_clip=1.0)

    with FlopCounterMode(display=False) as counter:
        step()
    flops_per_step = counter.get_total_flops()
    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    step_s = statistics.median(times)
    gemm = gemm_flops(args.gemm, 10, device)
    result = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "family": args.family,
        "preset": args.preset,
        "params_M": count_parameters(model) / 1e6,
        "batch": args.batch,
        "latent": [args.channels, args.input_size, args.input_size],
        "tokens": cfg.grid_size**2,
        "step_ms_median": step_s * 1e3,
        "step_ms_spread": [min(times) * 1e3, max(times) * 1e3],
        "img_per_s": args.batch / step_s,
        "model_gflop_per_step": flops_per_step / 1e9,
        "model_gflop_per_s": flops_per_step / step_s / 1e9,
        "gemm_gflop_per_s": gemm / 1e9,
        "model_over_gemm": flops_per_step / step_s / gemm,
    }
    rows = [
        ("device", result["device"]),
        ("model", f"{args.family} {args.preset}, {result['params_M']:.2f}M params, {result['tokens']} tokens"),
        ("batch", args.batch),
        ("step (median)", f"{result['step_ms_median']:.1f} ms  (min {result['step_ms_spread'][0]:.1f}, max {result['step_ms_spread'][1]:.1f})"),
        ("img/s", f"{result['img_per_s']:.1f}"),
        ("model GFLOP / step", f"{result['model_gflop_per_step']:.2f}"),
        ("model GFLOP/s", f"{result['model_gflop_per_s']:.1f}"),
        (f"GEMM {args.gemm}^3 GFLOP/s", f"{result['gemm_gflop_per_s']:.1f}"),
        ("model / GEMM", f"{100 * result['model_over_gemm']:.0f}%"),
    ]
    width = max(len(k) for k, _ in rows)
    print("| " + "what".ljust(width) + " | value |\n|" + "-" * (width + 2) + "|-------|")
    for k, v in rows:
        print(f"| {k.ljust(width)} | {v} |")
    return write_json(result, args.out)


if __name__ == "__main__":
    main()
