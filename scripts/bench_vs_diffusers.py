"""Our PixArt-α-preset mmDiT vs diffusers' PixArtTransformer2DModel at the identical config.

    python scripts/bench_vs_diffusers.py                    # eager vs eager, ~10 min on 2 CPU cores
    python scripts/bench_vs_diffusers.py --compile-ours     # ours under torch.compile (say so when quoting)
    python scripts/bench_vs_diffusers.py --compile-ours --compile-mode max-autotune   # Inductor's C++ GEMM templates
    python scripts/bench_vs_diffusers.py --pairs 21 --out bench/vs_diffusers.json

Config: 12 blocks, hidden 384, 6 heads, 16x32x32 latents, patch 2, 64 text tokens of width
384, batch 8, fp32. Both models get the same weights (ours exported with
models.diffusers_pixart.to_diffusers), the same torch.optim.AdamW and the same training step,
the trainer's (training/step.py train_step: flow draws, forward, loss, backward, clipping,
AdamW; diffusers' model called through a thin adapter). Timings are
interleaved A/B: each pair times a few training steps of ours and of theirs (the order
alternates pair by pair), the ratio is taken pair by pair and its median reported (single
timings on shared machines vary by 10%; short pairs, many of them, see the least of it).
Also: model FLOP/s (torch.utils.flop_counter) against a 2048^3 fp32 GEMM timed in every
pair (the ratio per pair, its median reported); peak memory of one training step with and
without activation checkpointing (a fresh process each: live tensor storage counted op by
op, and Linux VmHWM after resetting it; `--memory-only` runs just these); sampling
throughput, 20 Euler steps with CFG, ours (flow.sampling) vs the diffusers model driven by
FlowMatchEulerDiscreteScheduler, in alternating pairs.
The kernel floor, timed in every pair: one step's matrix products and attention kernels
replayed alone, plus AdamW's step (``kernel_floor``). No implementation of this model with
this optimizer steps faster with PyTorch's kernels, so diffusers' step over it is about the
most any could gain (the README: ~1% more with oneDNN's forward GEMMs).
Each timing follows one untimed step of the same model (`--settle-steps`): the first
step after the other model's pays for that model's footprint in the caches and the heap
(measured: diffusers' step took 9% longer straight after ours, with 4x the page
faults), which a training run, one model step after step, never sees.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import weakref
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scripts.results import write_json  # noqa: E402
from models.cli import HelpFormatter  # noqa: E402

CFG = dict(depth=12, hidden_size=384, num_heads=6, input_size=32, in_channels=16, caption_channels=384, patch_size=2)
BATCH, TOKENS = 8, 64


def build(seed: int = 0):
    import torch

    from models.diffusers_pixart import to_diffusers
    from models.presets import build_model, model_config

    torch.manual_seed(seed)
    ours = build_model("mmdit", model_config("mmdit", "PixArt-alpha-XL/2", **CFG, pixels_per_latent=8))
    for p in ours.parameters():  # non-trivial weights (zero-init outputs would make the step degenerate)
        p.data.normal_(0, 0.02)
    theirs = to_diffusers(ours)
    return ours.train(), theirs.train()


def inputs(seed: int = 1):
    import torch

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(BATCH, CFG["in_channels"], CFG["input_size"], CFG["input_size"], generator=g)
    t = torch.rand(BATCH, generator=g)
    text = torch.randn(BATCH, TOKENS, CFG["caption_channels"], generator=g)
    mask = torch.ones(BATCH, TOKENS, dtype=torch.bool)  # 64 real tokens: nothing padded
    target = torch.randn_like(x)
    return x, t, text, mask, target


def optimizer(params):
    """The one optimizer both models train with (the same implementation, so only the models differ)."""
    import torch

    return torch.optim.AdamW(params, lr=1e-4)


class DiffusersCall:
    """diffusers' PixArtTransformer2DModel called the way our models are: (x, t in [0, 1], text, mask)."""

    def __init__(self, model):
        self.model = model

    def __call__(self, x, t, encoder_hidden_states, encoder_attention_mask):
        return self.model(x, encoder_hidden_states=encoder_hidden_states, encoder_attention_mask=encoder_attention_mask.long(),
                          timestep=t * 1000, added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)[0]


def step_fns(ours, theirs, compile_ours: bool = False, compile_theirs: bool = False, compile_mode: str = "default"):
    """One training step of each model: the trainer's train_step on the benchmark's batch."""
    import torch

    from training.step import Local, MicroBatch, train_step

    x, _, text, mask, _ = inputs()
    cond = {"encoder_hidden_states": text, "encoder_attention_mask": mask}
    fo = torch.compile(ours, mode=compile_mode) if compile_ours else ours
    ft = torch.compile(theirs, mode=compile_mode) if compile_theirs else theirs
    opt_o, opt_t = optimizer(ours.parameters()), optimizer(theirs.parameters())
    par_o, par_t = Local(ours, fo), Local(theirs, DiffusersCall(ft))

    def ours_step():
        return train_step(par_o, opt_o, [MicroBatch.draw(x, cond)], 1, grad_clip=1.0)

    def theirs_step():
        return train_step(par_t, opt_t, [MicroBatch.draw(x, cond)], 1, grad_clip=1.0)

    ours_step.optimizer, theirs_step.optimizer = opt_o, opt_t
    return ours_step, theirs_step


def timed(fn, n: int, settle: int = 0) -> float:
    """Seconds per call of ``fn`` over ``n`` calls, after ``settle`` untimed ones."""
    for _ in range(settle):
        fn()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n


def alternating(ours_fn, theirs_fn, n: int, time_one):
    """``n`` A/B pairs of timings ``(ours_s, theirs_s)``: ours first in even pairs, theirs first in
    odd ones, so drift within a pair cancels."""
    for i in range(n):
        if i % 2:
            theirs_s = time_one(theirs_fn)
            yield time_one(ours_fn), theirs_s
        else:
            ours_s = time_one(ours_fn)
            yield ours_s, time_one(theirs_fn)


def gemm_timer():
    """A function returning the FLOP/s of a 2048^3 fp32 GEMM (best of 3), timed anew at each call:
    the benchmark times it in every pair, beside the two models' steps, since this machine's
    speed drifts by 10-30% over minutes."""
    import torch

    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    for _ in range(2):
        a @ b
    return lambda: 2 * 2048**3 / min(timed(lambda: a @ b, 1) for _ in range(3))


def backward_once(ours, mode) -> None:
    """One forward + backward of ``ours`` on the benchmark's inputs under ``mode`` (a dispatch
    mode that watches it), gradients dropped after."""
    x, t, text, mask, target = inputs()
    with mode:
        (ours(x, t, text, mask) - target).square().mean().backward()
    ours.zero_grad(set_to_none=True)


def model_flops(ours) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    fc = FlopCounterMode(display=False)
    backward_once(ours, fc)
    return float(fc.get_total_flops())


def kernel_floor(ours):
    """A callable replaying the matrix products and attention kernels of one training step of
    ``ours`` (eager), and AdamW's step: the work any implementation of this model must do with
    the benchmark's optimizer. With PyTorch's kernels no step is faster than its own kernels, so
    diffusers' step / this bounds what ``ours`` could reach (the README: oneDNN's forward GEMMs
    would lower it by ~1%).

    Recorded with a TorchDispatchMode (forward and backward): every aten mm / addmm / bmm /
    baddbmm / convolution and CPU flash attention (forward, backward) with its arguments' shapes
    and strides. Replayed on tensors of those layouts filled with N(0, 1), one set per distinct
    call (the blocks' identical calls share theirs, so inputs are as warm in the caches as they
    can be: measured 2-5% faster than fresh tensors for every call). addmm replays as mm: its
    bias could be added in a pass the step makes anyway, so the floor leaves it out. Flash
    attention's backward gets the output and log-sum-exp of a forward on its own inputs (random
    ones would overflow). AdamW steps on a copy of the parameters with random gradients (its
    state allocated by one untimed step first; ``floor.optimizer``)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    aten = torch.ops.aten
    flash, flash_bwd = aten._scaled_dot_product_flash_attention_for_cpu.default, aten._scaled_dot_product_flash_attention_for_cpu_backward.default
    shared = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default, flash, flash_bwd,
              aten.convolution.default, aten.convolution_backward.default}  # the patch embedding, a convolution in both
    calls = []

    def layout(a):
        return ("T", tuple(a.shape), tuple(a.stride()), a.dtype) if isinstance(a, torch.Tensor) else a

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in shared:
                calls.append((func, [layout(a) for a in args], {k: layout(v) for k, v in (kwargs or {}).items()}))
            return func(*args, **(kwargs or {}))

    backward_once(ours, Record())

    def make(a):
        if isinstance(a, tuple) and a and a[0] == "T":
            return torch.empty_strided(a[1], a[2], dtype=a[3]).normal_()
        return a

    materialized, replay = {}, []  # one set of tensors per distinct call: the same block's calls reuse them
    for func, args, kwargs in calls:
        key = repr((func, args, sorted(kwargs.items())))
        if key not in materialized:
            args, kwargs = [make(a) for a in args], {k: make(v) for k, v in kwargs.items()}
            if func is aten.addmm.default:
                func, args, kwargs = aten.mm.default, args[1:3], {}
            elif func is flash_bwd:  # out and logsumexp from a forward on these q, k, v
                out, lse = flash(*args[1:4], args[6], args[7], **kwargs)
                args[4], args[5] = args[4].copy_(out), args[5].copy_(lse)
                args[0].mul_(1e-3)
            materialized[key] = (func, args, kwargs)
        replay.append(materialized[key])
    params = [p.detach().clone().requires_grad_() for p in ours.parameters()]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    opt = optimizer(params)
    opt.step()  # allocates the state, untimed

    def floor():
        for func, args, kwargs in replay:
            func(*args, **kwargs)
        opt.step()

    floor.optimizer = opt
    floor.counts = dict(Counter(func.overloadpacket.__name__ for func, _, _ in calls))
    return floor


class LiveTensorBytes:
    """Bytes of tensor storage alive, and their peak, while active: every storage an op creates is
    counted until it is freed (a TorchDispatchMode; CPU has no allocator statistics). Storages that
    exist on entry (weights, optimizer state) are passed in with ``hold``."""

    def __init__(self, *held):
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves

        import torch

        tracker = self
        self._tensor = torch.Tensor  # hold() runs on every op's outputs: no imports there
        self.live = self.peak = 0
        self._seen = weakref.WeakSet()

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for leaf in tree_leaves(out):
                    tracker.hold(leaf)
                return out

        self.mode = _Mode()
        for t in held:
            self.hold(t)

    def hold(self, t) -> None:
        if not isinstance(t, self._tensor):
            return
        storage = t.untyped_storage()
        if storage in self._seen:
            return
        self._seen.add(storage)
        n = storage.nbytes()
        self.live += n
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, n)

    def _free(self, n: int) -> None:
        self.live -= n


def memory_child(which: str, checkpointing: bool) -> dict:
    """Run in a fresh process: peak memory of one training step after a warm-up step (only the
    measured model is kept: weights, gradients and AdamW state of one model, as in training).
    Two readings: the peak of live tensor storage over the step (weights + AdamW state +
    activations + gradients; what torch.cuda.max_memory_allocated reports on a GPU), and the
    process's peak RSS (Linux VmHWM after resetting it; includes the libraries, ~1 GiB)."""
    import gc

    import torch

    ours, theirs = build()
    if which == "ours":  # only the measured model stays in memory
        theirs = torch.nn.Linear(1, 1)
        ours.gradient_checkpointing = checkpointing
    else:
        ours = torch.nn.Linear(1, 1)
        if checkpointing:
            theirs.enable_gradient_checkpointing()
    gc.collect()
    model = ours if which == "ours" else theirs
    so, st = step_fns(ours, theirs)
    step = so if which == "ours" else st
    step()  # optimizer state exists from here on

    def status(key: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1]) * 1024
        raise RuntimeError(f"{key} not in /proc/self/status")

    gc.collect()
    opt_state = [v for p in model.parameters() for v in step.optimizer.state.get(p, {}).values()]
    tracker = LiveTensorBytes(*model.parameters(), *model.buffers(), *opt_state)
    held = tracker.live
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS (Linux >= 4.0)
    base = status("VmRSS:")
    with tracker.mode:
        step()
    peak = status("VmHWM:")
    return {"model": which, "activation_checkpointing": checkpointing, "rss_before_step": base, "peak_rss": peak,
            "step_peak_above_before": peak - base, "tensor_bytes_held": held, "tensor_peak": tracker.peak}


def sampling(ours, theirs, steps: int = 20, cfg: float = 4.0):
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler

    from flow.sampling import sample
    from inference.pipeline import call_model, prepare_condition

    x, _, text, mask, _ = inputs()
    null = torch.zeros_like(text)
    null_mask = torch.zeros_like(mask)
    null_mask[:, 0] = True
    cond = {"encoder_hidden_states": text, "encoder_attention_mask": mask}
    uncond = {"encoder_hidden_states": null, "encoder_attention_mask": null_mask}
    sched = FlowMatchEulerDiscreteScheduler(shift=1.0)

    @torch.no_grad()
    def ours_sample():
        return sample(lambda z, t, c: call_model(ours, z, t, c), x, cond, uncond, cfg_scale=cfg, steps=steps,
                      prepare=lambda c: prepare_condition(ours, c))  # the text's K/V once per run, as inference.pipeline does

    @torch.no_grad()
    def theirs_sample():
        sched.set_timesteps(steps)
        z = x
        both_text, both_mask = torch.cat([null, text]), torch.cat([null_mask, mask]).long()
        for t in sched.timesteps:
            out = theirs(torch.cat([z, z]), encoder_hidden_states=both_text, encoder_attention_mask=both_mask,
                         timestep=t.expand(2 * BATCH), added_cond_kwargs={"resolution": None, "aspect_ratio": None},
                         return_dict=False)[0]
            v_u, v_c = out.chunk(2)
            z = sched.step(v_u + cfg * (v_c - v_u), t, z, return_dict=False)[0]
        return z

    return ours_sample, theirs_sample


def run_description() -> dict:
    """The machine and the benchmark config, for every JSON this script writes."""
    import torch

    return {"machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads",
            "config": {**CFG, "batch": BATCH, "text_tokens": TOKENS, "dtype": "fp32"}}


def memory_runs() -> list[dict]:
    """The memory children: ours and diffusers, with and without activation checkpointing."""
    mem = []
    for which in ("ours", "diffusers"):
        for ckpt in (False, True):
            out = subprocess.run([sys.executable, __file__, "--memory-child", which, "1" if ckpt else "0"], capture_output=True,
                                 text=True, check=True)
            mem.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"memory: {which}, activation checkpointing {ckpt}: done", flush=True)
    return mem


def print_memory(record: dict) -> None:
    for m in record.get("memory", []):
        print(f"| peak tensor memory of a step, {m['model']}, activation checkpointing {m['activation_checkpointing']} | "
              f"{m['tensor_peak'] / 2**20:.0f} MiB (weights + AdamW state {m['tensor_bytes_held'] / 2**20:.0f}) | "
              f"peak RSS {m['peak_rss'] / 2**20:.0f} MiB, step adds {m['step_peak_above_before'] / 2**20:.0f} MiB | |")
    for which in ("ours", "diffusers"):
        by = {m["activation_checkpointing"]: m for m in record.get("memory", []) if m["model"] == which}
        if len(by) == 2:
            cut = 1 - by[True]["tensor_peak"] / by[False]["tensor_peak"]
            record.setdefault("checkpointing_cut", {})[which] = cut
            print(f"activation checkpointing cuts {which}'s peak tensor memory by {cut:.0%}")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--pairs", type=int, default=15, help="A/B pairs of training-step timings (the median ratio is reported)")
    ap.add_argument("--steps-per-timing", type=int, default=1, help="training steps per timing (one pair = this many of each)")
    ap.add_argument("--settle-steps", type=int, default=1,
                    help="untimed steps before each timing: the first step after the other model's pays for its "
                         "footprint in caches and the heap (measured: +9%%), which a real run never sees")
    ap.add_argument("--compile-ours", action="store_true")
    ap.add_argument("--compile-theirs", action="store_true")
    ap.add_argument("--compile-mode", default="default", choices=["default", "max-autotune"],
                    help="torch.compile mode for whichever model is compiled; max-autotune also tries Inductor's C++ GEMM "
                         "templates (bias and pointwise epilogues fused into the GEMM), ~1 min more compile")
    ap.add_argument("--sampling-pairs", type=int, default=4, help="A/B pairs of 20-step sampling runs (~70 s a pair; 0 skips)")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--memory-only", action="store_true", help="only the four memory children (~1 min on 2 cores)")
    ap.add_argument("--out", default="bench/vs_diffusers.json")
    ap.add_argument("--memory-child", nargs=2, metavar=("MODEL", "CHECKPOINTING"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.memory_child:
        print(json.dumps(memory_child(args.memory_child[0], args.memory_child[1] == "1")))
        return {}

    if args.memory_only:
        record = {**run_description(), "memory": memory_runs()}
        print("\n| measure | value | process | |\n|---|---|---|---|")
        print_memory(record)
        return write_json(record, args.out)

    ours, theirs = build()
    so, st = step_fns(ours, theirs, args.compile_ours, args.compile_theirs, args.compile_mode)
    for _ in range(2):  # warm-up (and compilation)
        so(), st()
    gemm_flops = gemm_timer()
    floor = kernel_floor(ours)
    floor()
    time_one = lambda f: timed(f, args.steps_per_timing, args.settle_steps)  # noqa: E731
    pairs = []
    for i, (a, b) in enumerate(alternating(so, st, args.pairs, time_one)):
        pairs.append({"ours_s": a, "theirs_s": b, "ratio": b / a, "floor_s": time_one(floor), "gemm_flop_s": gemm_flops()})
        print(f"pair {i}: ours {a * 1e3:.0f} ms, diffusers {b * 1e3:.0f} ms, ratio {b / a:.3f}, kernel floor "
              f"{pairs[-1]['floor_s'] * 1e3:.0f} ms, GEMM {pairs[-1]['gemm_flop_s'] / 1e9:.0f} GFLOP/s", flush=True)
    ratio = statistics.median(p["ratio"] for p in pairs)
    ours_s = statistics.median(p["ours_s"] for p in pairs)
    theirs_s = statistics.median(p["theirs_s"] for p in pairs)
    flops = model_flops(ours)
    gemm = statistics.median(p["gemm_flop_s"] for p in pairs)
    record = {
        **run_description(),
        "compiled": {"ours": args.compile_ours, "diffusers": args.compile_theirs, "mode": args.compile_mode},
        "train_step": {"pairs": pairs, "steps_per_timing": args.steps_per_timing, "settle_steps": args.settle_steps,
                       "median_ratio_theirs_over_ours": ratio, "ours_img_s": BATCH / ours_s, "diffusers_img_s": BATCH / theirs_s},
        "kernel_floor": {"calls_per_step": floor.counts, "median_s": statistics.median(p["floor_s"] for p in pairs),
                         "diffusers_over_floor": statistics.median(p["theirs_s"] / p["floor_s"] for p in pairs),
                         "ours_over_floor": statistics.median(p["ours_s"] / p["floor_s"] for p in pairs)},
        "flops": {"model_flops_per_step": flops, "model_flop_s": flops / ours_s, "gemm_flop_s": gemm,
                  "model_over_gemm": statistics.median(flops / p["ours_s"] / p["gemm_flop_s"] for p in pairs),
                  "diffusers_over_gemm": statistics.median(flops / p["theirs_s"] / p["gemm_flop_s"] for p in pairs)},
    }
    del floor
    if args.sampling_pairs:
        ours.eval(), theirs.eval()
        o_sample, t_sample = sampling(ours, theirs)
        o_sample(), t_sample()
        sp = [{"ours_s": a, "theirs_s": b, "ratio": b / a}  # a sample is 20 model calls: no settle step
              for a, b in alternating(o_sample, t_sample, args.sampling_pairs, lambda f: timed(f, 1))]
        record["sampling"] = {"steps": 20, "cfg": True, "pairs": sp,
                              "median_ratio_theirs_over_ours": statistics.median(p["ratio"] for p in sp),
                              "ours_img_s": BATCH / statistics.median(p["ours_s"] for p in sp),
                              "diffusers_img_s": BATCH / statistics.median(p["theirs_s"] for p in sp)}
    if not args.skip_memory:
        record["memory"] = memory_runs()
    t = record["train_step"]
    print("\n| measure | ours | diffusers | ours vs diffusers |\n|---|---|---|---|")
    print(f"| training step img/s (median of {args.pairs} A/B pairs) | {t['ours_img_s']:.2f} | {t['diffusers_img_s']:.2f} | {ratio:.3f}x |")
    f = record["flops"]
    print(f"| model FLOP/s / the GEMM's, per pair (GEMM median {gemm / 1e9:.0f} GFLOP/s) | {f['model_over_gemm']:.0%} | {f['diffusers_over_gemm']:.0%} | |")
    k = record["kernel_floor"]
    print(f"| step time / kernel floor ({k['median_s'] * 1e3:.0f} ms: GEMMs, attention, AdamW) | {k['ours_over_floor']:.3f} | "
          f"{k['diffusers_over_floor']:.3f} | at most {k['diffusers_over_floor']:.3f}x |")
    if "sampling" in record:
        s = record["sampling"]
        print(f"| sampling img/s (20 Euler steps, CFG) | {s['ours_img_s']:.2f} | {s['diffusers_img_s']:.2f} | "
              f"{s['median_ratio_theirs_over_ours']:.3f}x |")
    print_memory(record)
    return write_json(record, args.out)


if __name__ == "__main__":
    main()
