"""Score a shapes-demo checkpoint with the evaluator at given sampling settings.

    python scripts/evaluate_checkpoint.py runs/demo/stage1/checkpoints/step_0003500 --cfg 4 --steps 20
    python scripts/evaluate_checkpoint.py CKPT --cfg 2 4 6 --steps 10 20 40     # a sweep

Prints a table (class / shape / colour accuracy, EMA weights unless --raw) and writes a grid PNG.
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
    ap.add_argument("--n", type=int, default=480, help="samples (cycled over the classes)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--raw", action="store_true", help="score the raw weights instead of the EMA")
    ap.add_argument("--out", default=None, help="JSON file for the results")
    args = ap.parse_args(argv)

    import torch

    from data.evaluator import class_attribute_accuracy
    from inference.images import make_grid, save_png, to_uint8
    from inference.pipeline import SampleSettings, generate, latent_shape, load_model

    model, ae, meta = load_model(args.checkpoint, use_ema=not args.raw)
    k = meta["conditioning"]["num_classes"]
    labels = torch.arange(args.n) % k
    shift = args.shift if args.shift is not None else meta["sampling"]["shift"]
    rows = []
    print("| cfg | steps | class acc | shape acc | colour acc |\n|---|---|---|---|---|")
    for cfg_scale, steps in itertools.product(args.cfg, args.steps):
        s = SampleSettings(steps=steps, cfg_scale=cfg_scale, solver=args.solver, shift=shift, seed=args.seed)
        images = generate(model, ae, labels, torch.full_like(labels, k), latent_shape(meta), s)
        acc = class_attribute_accuracy(images, labels.tolist())
        rows.append({"cfg_scale": cfg_scale, "steps": steps, **{f"{a}_accuracy": v for a, v in acc.items()}})
        print(f"| {cfg_scale} | {steps} | {acc['all']:.3f} | {acc['shape']:.3f} | {acc['colour']:.3f} |", flush=True)
        png = Path(args.checkpoint) / f"eval_cfg{cfg_scale}_steps{steps}.png"
        save_png(make_grid(to_uint8(images[: 4 * k]), ncols=k, upscale=3), png)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
