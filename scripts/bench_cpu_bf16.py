"""CPU bf16 autocast (``precision.autocast_cpu=true``) against fp32: the training step, A/B.

    python scripts/bench_cpu_bf16.py                  # the demo mmDiT on a stage-4 canvas: batch 32 of 24x48, 16 text tokens
    python scripts/bench_cpu_bf16.py --pairs 12 --height 32 --width 32

Three ways to run the same step, timed in rotating order within each round (so drift on a
shared machine hits all three alike), each timing after one untimed step of the same kind:
- ``fp32``: no autocast (the default on CPU);
- ``bf16``: autocast, QK-norm and attention in fp32 (what ``autocast_cpu`` does);
- ``bf16, bf16 QK-norm + attention``: autocast with QK-norm and attention left in bf16 too, for comparison.
Reports the median of per-round speed ratios against fp32, and bf16 vs fp32 GEMM FLOP/s at
the step's largest GEMM shape. Prints a table and writes JSON (default bench/cpu_bf16.json).
Worth it only on CPUs that multiply bf16 natively (x86 AVX512-BF16 or AMX).
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


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--preset", default="demo", help="mmdit preset")
    ap.add_argument("--height", type=int, default=24, help="canvas height (pixels = latents here: 3 channels)")
    ap.add_argument("--width", type=int, default=48)
    ap.add_argument("--input-size", type=int, default=32, help="the model's square base canvas (stage 4's: 32)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--text-tokens", type=int, default=16)
    ap.add_argument("--pairs", type=int, default=8, help="rounds; each times every mode once")
    ap.add_argument("--out", default="bench/cpu_bf16.json")
    args = ap.parse_args(argv)

    import torch

    from models import layers
    from models.presets import build_model, count_parameters, model_config
    from training.precision import cpu_has_native_bf16
    from training.step import Local, MicroBatch, train_step

    torch.manual_seed(0)
    cfg = model_config("mmdit", args.preset, input_size=args.input_size, in_channels=3, caption_channels=384,
                       micro_conditions=True, pixels_per_latent=1)
    model = build_model("mmdit", cfg)
    for p in model.parameters():  # a trained-looking model: no zero-initialized outputs short-cutting the work
        p.data.normal_(0, 0.02)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    n = args.batch
    x0 = torch.randn(n, 3, args.height, args.width)
    text = torch.randn(n, args.text_tokens, 384)
    mask = torch.ones(n, args.text_tokens, dtype=torch.bool)
    cond = {"encoder_hidden_states": text, "encoder_attention_mask": mask}
    parallel = Local(model)
    fp32_attention = layers._cpu_autocast

    def step(mode: str) -> None:
        """The trainer's step (training/step.py), forward under this mode's autocast."""
        layers._cpu_autocast = fp32_attention if mode != "bf16, bf16 QK-norm + attention" else (lambda t: False)
        try:
            train_step(parallel, opt, [MicroBatch.draw(x0, cond)], 1, grad_clip=1.0,
                       forward_context=lambda: torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode != "fp32"))
        finally:
            layers._cpu_autocast = fp32_attention

    def timed(mode: str) -> float:
        step(mode)  # settle: this mode's buffers, not the previous mode's
        t0 = time.perf_counter()
        step(mode)
        return time.perf_counter() - t0

    modes = ["fp32", "bf16", "bf16, bf16 QK-norm + attention"]
    for mode in modes:
        step(mode)
    times: dict[str, list[float]] = {m: [] for m in modes}
    for i in range(args.pairs):
        order = modes[i % 3:] + modes[: i % 3]
        for mode in order:
            times[mode].append(timed(mode))
        print(f"round {i + 1}/{args.pairs}: " + ", ".join(f"{m} {times[m][-1] * 1e3:.0f} ms" for m in modes), flush=True)

    tokens = (args.height // cfg.patch_size) * (args.width // cfg.patch_size)
    gemm = {}
    for dtype in (torch.float32, torch.bfloat16):
        a, b = torch.randn(n * tokens, cfg.hidden_size, dtype=dtype), torch.randn(cfg.hidden_size, 4 * cfg.hidden_size, dtype=dtype)
        spans = []
        for _ in range(12):
            t0 = time.perf_counter()
            a @ b
            spans.append(time.perf_counter() - t0)
        best = min(spans[2:])  # the first two warm up
        gemm[str(dtype).removeprefix("torch.")] = 2 * a.shape[0] * a.shape[1] * b.shape[1] / best / 1e9

    speedup = {m: statistics.median(f / t for f, t in zip(times["fp32"], times[m])) for m in modes}
    result = {
        "device": f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "native_bf16": cpu_has_native_bf16(),
        "torch": torch.__version__,
        "model": f"mmdit {args.preset}, {count_parameters(model) / 1e6:.2f}M params, micro-conditions",
        "batch": n,
        "canvas": [args.height, args.width],
        "tokens": tokens,
        "rounds": args.pairs,
        "step_ms_median": {m: statistics.median(times[m]) * 1e3 for m in modes},
        "step_ms_per_round": {m: [round(s * 1e3, 1) for s in times[m]] for m in modes},
        "speedup_vs_fp32_median_per_round": speedup,
        "gemm_gflop_per_s": gemm,
        "gemm_shape": [n * tokens, cfg.hidden_size, 4 * cfg.hidden_size],
    }
    print(f"\n{result['device']}, native bf16: {result['native_bf16']}; {result['model']}; batch {n} of "
          f"{args.height}x{args.width} ({tokens} tokens); {args.pairs} rounds")
    print("| mode | step (median) | speed vs fp32 (median per round) |\n|---|---|---|")
    for m in modes:
        print(f"| {m} | {result['step_ms_median'][m]:.0f} ms | {speedup[m]:.2f}x |")
    print(f"| GEMM {n * tokens}x{cfg.hidden_size}x{4 * cfg.hidden_size} | fp32 {gemm['float32']:.0f} GFLOP/s | "
          f"bf16 {gemm['bfloat16']:.0f} GFLOP/s ({gemm['bfloat16'] / gemm['float32']:.1f}x) |")
    return write_json(result, args.out)


if __name__ == "__main__":
    main()
