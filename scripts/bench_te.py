"""Transformer Engine FP8 vs bf16: the mmDiT training step on one GPU.

    python scripts/bench_te.py                                   # PixArt-alpha XL/2 at 256 px (32x32 latents), batch 32
    python scripts/bench_te.py --input-size 64 --batch 16        # 512 px
    python scripts/bench_te.py --recipes current delayed --rounds 7

Every arm is the same model (same weights, loaded through load_portable) trained on the same
batches with the same AdamW: `bf16` is precision=torch (nn.Linear under bf16 autocast), each
recipe is precision=te (te.Linear under TE's FP8 autocast, inside the same bf16 autocast).
The arms take turns, `--steps` timed steps each per round, and the table reports each arm's
median step time over the rounds and its speed relative to bf16 taken round by round (median),
so a slow spell on a shared machine hits every arm alike. Also: the memory one step of each arm
needs on top of what is resident (every arm's weights and AdamW state stay on the GPU, so a
plain peak would count the other arms too), and the loss each arm reached on the same batches
(FP8 must train, not only run fast).
Needs a Hopper or Blackwell GPU with TE. Prints a table and writes JSON (default bench/te.json).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scripts.results import write_json  # noqa: E402
from models.cli import HelpFormatter  # noqa: E402


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--preset", default="PixArt-alpha-XL/2")
    ap.add_argument("--block", default="pixart", choices=["pixart", "joint"])
    ap.add_argument("--input-size", type=int, default=32, help="latent side (32 = 256 px with an 8x VAE)")
    ap.add_argument("--channels", type=int, default=4, help="latent channels")
    ap.add_argument("--text-tokens", type=int, default=120)
    ap.add_argument("--caption-channels", type=int, default=4096, help="text encoder width (T5-XXL: 4096)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--recipes", nargs="+", default=["current", "delayed"], help="TE recipes (auto, current, delayed, mxfp8)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per arm per round")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--profile", type=int, default=0, help="also profile this many steps per arm: GPU busy time and top kernels")
    ap.add_argument("--out", default="bench/te.json")
    args = ap.parse_args(argv)

    import torch

    import contextlib

    from models.linear import convert, fp8_context, load_portable, transformer_engine
    from models.presets import build_model, count_parameters, model_config
    from training.step import Local, MicroBatch, train_step

    if not torch.cuda.is_available():
        raise SystemExit("bench_te.py needs a CUDA GPU (Hopper or Blackwell) with Transformer Engine")
    transformer_engine()  # stops with what to install where TE is missing
    device = torch.device("cuda")
    cfg = model_config("mmdit", args.preset, input_size=args.input_size, in_channels=args.channels,
                       caption_channels=args.caption_channels, block=args.block)
    torch.manual_seed(0)
    ref = build_model("mmdit", cfg).to(device)
    arms = {"bf16": ("torch", None)} | {f"te {r}": ("te", r) for r in args.recipes}
    models, opts = {}, {}
    for name, (backend, _) in arms.items():
        m = ref if backend == "torch" else convert(build_model("mmdit", cfg).to(device), backend)
        if m is not ref:
            load_portable(m, ref.state_dict())
        models[name], opts[name] = Local(m), torch.optim.AdamW(m.parameters(), lr=1e-4)

    n = args.batch
    g = torch.Generator(device=device).manual_seed(1)
    x0 = torch.randn(n, args.channels, args.input_size, args.input_size, device=device, generator=g)
    text = torch.randn(n, args.text_tokens, args.caption_channels, device=device, generator=g)
    mask = torch.ones(n, args.text_tokens, dtype=torch.bool, device=device)
    losses = {name: [] for name in arms}

    cond = {"encoder_hidden_states": text, "encoder_attention_mask": mask}

    def step(name: str, seed: int) -> None:
        """The trainer's step (training/step.py) under bf16 autocast and, for TE arms, TE's FP8 autocast."""
        backend, recipe = arms[name]

        def context():
            stack = contextlib.ExitStack()
            stack.enter_context(torch.autocast("cuda", dtype=torch.bfloat16))
            stack.enter_context(fp8_context(backend, recipe or "auto"))
            return stack

        gs = torch.Generator(device=device).manual_seed(seed)  # every arm sees the same noise and timesteps
        out = train_step(models[name], opts[name], [MicroBatch.draw(x0, cond, gen=gs)], 1, grad_clip=1.0, forward_context=context)
        losses[name].append(out.losses[0][0])

    step_mem = {}
    for name in arms:
        for i in range(args.warmup):  # the first step also creates the arm's AdamW state
            step(name, i)
        torch.cuda.synchronize()
        resident = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step(name, args.warmup)
        torch.cuda.synchronize()
        step_mem[name] = (torch.cuda.max_memory_allocated() - resident) / 2**30
    times = {name: [] for name in arms}
    seed = 100
    for r in range(args.rounds):
        order = list(arms) if r % 2 == 0 else list(arms)[::-1]
        for name in order:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for s in range(args.steps):
                step(name, seed + s)
            torch.cuda.synchronize()
            times[name].append((time.perf_counter() - t0) / args.steps)
        seed += args.steps
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{k} {1e3 * v[-1]:.1f} ms" for k, v in times.items()), flush=True)

    base = times["bf16"]
    rows = []
    for name in arms:
        ms = statistics.median(times[name]) * 1e3
        speedup = statistics.median(b / a for a, b in zip(times[name], base))
        tail = torch.stack(losses[name][-args.steps:]).float().mean().item()
        rows.append({"arm": name, "step_ms_median": ms, "step_ms_rounds": [1e3 * v for v in times[name]],
                     "img_per_s": n / (ms / 1e3), "speedup_vs_bf16": speedup, "step_memory_gib": step_mem[name],
                     "loss_last_round": tail, "loss_first": losses[name][0].item()})
    profiles = {}  # after the losses are read: profiled steps train too
    for name in arms if args.profile else ():
        print(f"{name}:")
        profiles[name] = profile(lambda s, name=name: step(name, s), args.profile)
    weights_and_adam = sum(p.numel() * 4 * 3 for p in ref.parameters()) / 2**30  # fp32 weights + 2 AdamW moments, per arm
    print(f"\n{args.preset} ({count_parameters(ref) / 1e6:.0f}M params, block {args.block}), {(args.input_size // 2) ** 2} image tokens "
          f"+ {args.text_tokens} text tokens of width {args.caption_channels}, batch {n}, {torch.cuda.get_device_name()}")
    print(f"(weights + AdamW state: {weights_and_adam:.1f} GiB per arm; 'step memory' is what one step needs on top)")
    print("| arm | step (median) | img/s | vs bf16 (median of rounds) | step memory | loss, last round |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['arm']} | {r['step_ms_median']:.1f} ms | {r['img_per_s']:.0f} | {r['speedup_vs_bf16']:.3f}x | "
              f"{r['step_memory_gib']:.1f} GiB | {r['loss_last_round']:.4f} |")
    import transformer_engine

    record = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "transformer_engine": getattr(transformer_engine, "__version__", "?"), "preset": args.preset, "block": args.block,
              "params_M": count_parameters(ref) / 1e6, "latent": [args.channels, args.input_size, args.input_size],
              "text_tokens": args.text_tokens, "caption_channels": args.caption_channels, "batch": n,
              "rounds": args.rounds, "steps_per_round": args.steps, "weights_and_adam_gib_per_arm": weights_and_adam,
              "arms": rows, "profiles": profiles}
    return write_json(record, args.out)


def profile(run_step, steps: int) -> dict:
    """Wall time vs GPU kernel time per step (a GPU idle between kernels means the host can't keep up),
    and the kernels that take the most GPU time."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for s in range(steps):
            run_step(10_000 + s)
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / steps
    kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]  # GPU-side events only: no double counting
    gpu = sum(e.device_time for e in kernels) / 1e6 / steps  # us -> s
    launches = len(kernels) / steps
    by_name: dict[str, list[float]] = {}
    for e in kernels:
        by_name.setdefault(e.name, []).append(e.device_time)
    top = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:8]
    result = {"wall_ms": 1e3 * wall, "gpu_kernel_ms": 1e3 * gpu, "gpu_busy": gpu / wall, "kernels_per_step": launches,
              "top_kernels": [{"name": name[:90], "ms_per_step": sum(ts) / 1e3 / steps, "calls_per_step": len(ts) / steps}
                              for name, ts in top]}
    print(f"  profile: wall {result['wall_ms']:.1f} ms/step, GPU kernels {result['gpu_kernel_ms']:.1f} ms ({100 * result['gpu_busy']:.0f}% busy), "
          f"{launches:.0f} kernels/step")
    for k in result["top_kernels"]:
        print(f"    {k['ms_per_step']:7.2f} ms  x{k['calls_per_step']:<5.0f} {k['name']}")
    return result


if __name__ == "__main__":
    main()
