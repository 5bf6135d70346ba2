"""Attention kernels at the vs-diffusers benchmark's shapes: forward + backward, each kernel alone.

    python scripts/bench_attention.py                 # batch 8, 6 heads of 64, 256 queries; 256 and 64 keys
    python scripts/bench_attention.py --batch 32 --queries 288 --keys 288

Times PyTorch's default ``scaled_dot_product_attention`` (on CPU its flash kernel), the same call
forced onto the math backend, and a hand-written softmax(QK^T / sqrt(d)) V, rounds interleaved, the
median of each. Prints a table and writes JSON (default bench/attention.json). It answers one
question: would another attention kernel make our training step faster than one on PyTorch's
default (the README's "Ours vs diffusers": not by more than ~30 ms of a ~2.4 s step here).
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
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--queries", type=int, default=256, help="image tokens")
    ap.add_argument("--keys", type=int, nargs="+", default=[256, 64], help="key counts: self-attention, then text")
    ap.add_argument("--repeats", type=int, default=20, help="timed fwd+bwd per kernel and round")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default="bench/attention.json")
    args = ap.parse_args(argv)

    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    scale = args.head_dim ** -0.5

    def math_backend(q, k, v):
        with sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(q, k, v)

    kernels = {
        "sdpa default": F.scaled_dot_product_attention,
        "sdpa math": math_backend,
        "softmax(QK^T)V": lambda q, k, v: torch.softmax((q * scale) @ k.transpose(-1, -2), dim=-1) @ v,
    }

    def time_kernel(fn, keys: int) -> float:
        torch.manual_seed(0)
        shape = (args.batch, args.heads)
        q = torch.randn(*shape, args.queries, args.head_dim, requires_grad=True)
        k, v = (torch.randn(*shape, keys, args.head_dim, requires_grad=True) for _ in range(2))
        grad = torch.randn(*shape, args.queries, args.head_dim)
        for _ in range(3):
            fn(q, k, v).backward(grad)
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            fn(q, k, v).backward(grad)
            times.append(time.perf_counter() - t)
        return statistics.median(times) * 1e3

    ms = {(name, keys): [] for keys in args.keys for name in kernels}
    for r in range(args.rounds):
        for keys in args.keys:
            for name, fn in kernels.items():
                ms[name, keys].append(time_kernel(fn, keys))
        print(f"round {r + 1}/{args.rounds} done", flush=True)

    print(f"\nfwd + bwd ms (median of {args.repeats}, per round), batch {args.batch}, {args.heads} heads of {args.head_dim}, "
          f"{args.queries} queries")
    print("| kernel | " + " | ".join(f"{k} keys" for k in args.keys) + " |")
    print("|---|" + "---|" * len(args.keys))
    for name in kernels:
        print(f"| {name} | " + " | ".join(" / ".join(f"{t:.1f}" for t in ms[name, k]) for k in args.keys) + " |")
    return write_json({
        "machine": platform.platform(), "processor": platform.processor(), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "config": vars(args),
        "ms": {f"{name} @ {k} keys": ms[name, k] for name in kernels for k in args.keys},
    }, args.out)


if __name__ == "__main__":
    main()
