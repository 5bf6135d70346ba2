"""Score a shapes-demo checkpoint with the evaluator at given sampling settings.

    python scripts/evaluate_checkpoint.py runs/quality/stage1/checkpoints/step_0003500 --cfg 4 --steps 20
    python scripts/evaluate_checkpoint.py CKPT --cfg 2 4 6 --steps 10 20 40     # a sweep
    python scripts/evaluate_checkpoint.py runs/quality/stage2 --prompts held_out   # text: the held-out captions

Prints a table (EMA weights unless --raw) and writes a grid PNG. Class checkpoints: class /
shape / colour accuracy. Text checkpoints: caption accuracy (every attribute the prompt names
right) and per-attribute accuracy, on the held-out demo captions or --prompts given.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("--cfg", type=float, nargs="+", default=[4.0])
    ap.add_argument("--steps", type=int, nargs="+", default=[20])
    ap.add_argument("--solver", default="euler")
    ap.add_argument("--shift", type=float, default=None, help="default: the checkpoint's training shift")
    ap.add_argument("--n", type=int, default=480, help="samples (cycled over the classes or prompts)")
    ap.add_argument("--prompts", nargs="+", default=["held_out"], help="text checkpoints: prompts, or held_out")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--raw", action="store_true", help="score the raw weights instead of the EMA")
    ap.add_argument("--size", type=int, nargs=2, metavar=("HEIGHT", "WIDTH"), default=None,
                    help="image size in pixels (mmDiT: any multiple of the patch, e.g. an aspect bucket); default: the trained size")
    ap.add_argument("--out", default=None, help="JSON file for the results")
    args = ap.parse_args(argv)

    import torch

    from data.evaluator import attribute_accuracy, class_attributes
    from data.shapes import HELD_OUT_CAPTIONS, parse_caption
    from inference.images import make_grid, save_png, to_uint8
    from inference.pipeline import SampleSettings, generate, latent_shape, latent_shape_for, load_model, prompt_conditions
    from training.checkpoint import resolve

    ckpt = resolve(args.checkpoint)
    model, ae, meta = load_model(ckpt, use_ema=not args.raw)
    if meta["conditioning"]["type"] == "class":
        k = meta["conditioning"]["num_classes"]
        labels = torch.arange(args.n) % k
        cond, uncond = labels, torch.full_like(labels, k)
        wanted = class_attributes(labels)
        keys = ["shape", "colour"]
    else:
        prompts = list(HELD_OUT_CAPTIONS) if args.prompts == ["held_out"] else args.prompts
        k = len(prompts)
        chosen = [prompts[i % k] for i in range(args.n)]
        cond, uncond = prompt_conditions(meta, chosen)
        wanted = [parse_caption(p) for p in chosen]
        keys = ["shape", "colour", "size", "background"]
    shift = args.shift if args.shift is not None else meta["sampling"]["shift"]
    shape = latent_shape(meta)
    if args.size:
        try:
            shape = latent_shape_for(meta, ae.downsample, *args.size)
        except ValueError as e:
            ap.error(f"--size: {e}")
    rows = []
    print(f"| cfg | steps | all | {' | '.join(keys)} |\n|---|---|---|{'---|' * len(keys)}")
    for cfg_scale, steps in itertools.product(args.cfg, args.steps):
        s = SampleSettings(steps=steps, cfg_scale=cfg_scale, solver=args.solver, shift=shift, seed=args.seed)
        images = generate(model, ae, cond, uncond, shape, s)
        acc = attribute_accuracy(images, wanted)
        rows.append({"checkpoint": str(ckpt), "cfg_scale": cfg_scale, "steps": steps, "n": args.n, "latent_shape": list(shape),
                     **{f"{a}_accuracy": v for a, v in acc.items()}})
        print(f"| {cfg_scale} | {steps} | {acc['all']:.3f} | {' | '.join(f'{acc[a]:.3f}' for a in keys)} |", flush=True)
        tag = (f"_{shape[1]}x{shape[2]}" if args.size else "") + (f"_shift{shift:g}" if args.shift is not None else "") + \
            ("_raw" if args.raw else "")  # one file per setting: a sweep never overwrites another's grid
        png = ckpt / f"eval_cfg{cfg_scale}_steps{steps}{tag}.png"
        save_png(make_grid(to_uint8(images[: 4 * k]), ncols=k, upscale=3), png)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
