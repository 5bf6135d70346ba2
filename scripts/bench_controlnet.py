"""Train the demo's ControlNet on mask maps and measure whether samples follow their control: the ControlNet proof.

    python scripts/bench_controlnet.py                          # make demo's stage 4, at 1:2 and 2:1
    python scripts/bench_controlnet.py --experiment demo_controlnet         # 16x16, beside make demo's stage 2

Trains ``train_controlnet.py experiment=<--experiment>`` (mask maps, copies of the first 3 of the
6 blocks, the base frozen; demo_controlnet_buckets: stage 4's aspect buckets) unless --checkpoint
names a trained one, then samples the demo's held-out captions (never in any training data) with
control maps derived from freshly rendered held-out images: each caption with --per-caption maps of
its object at random places, on each of --canvases.
Scores, ControlNet against the base without control on the same captions and noise:
  control IoU       the generated image's foreground (data/control.py ``mask``) against the control mask;
                    also per object size, and the chance level: the same images against the mask of another
                    render of the same caption (what knowing the caption alone gives)
  caption accuracy  the shapes evaluator: every captioned attribute right
Writes --json (numbers, settings, timings) and --grid (rows: control maps, ControlNet, base).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # in place: the checkout's packages, not an install's
from models.cli import HelpFormatter  # noqa: E402
from scripts.results import trained, write_json  # noqa: E402


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--base", default=None, help="the frozen text checkpoint (default: make demo's stage 4 for demo_controlnet_buckets, "
                                                  "its stage 2 for demo_controlnet)")
    ap.add_argument("--experiment", default="demo_controlnet_buckets",
                    help="the ControlNet's training config: demo_controlnet_buckets (stage 4's canvases) or demo_controlnet (16x16)")
    ap.add_argument("--canvases", nargs="+", default=None,
                    help="HxW pixel canvases sampled (default: 24x48 48x24 for demo_controlnet_buckets, 16x16 for demo_controlnet; "
                         "on 16x16 and 32x32 a large object can hardly move, so the base matches any control by chance)")
    ap.add_argument("--checkpoint", default=None, help="a trained ControlNet checkpoint: skip training (its time is read "
                                                         "from the run's summary.json beside it)")
    ap.add_argument("--run-dir", default=None, help="the ControlNet run, resumed if it is there (default: runs/bench_controlnet_buckets "
                                                     "for demo_controlnet_buckets, runs/bench_controlnet for demo_controlnet)")
    ap.add_argument("--steps", type=int, default=600, help="training steps (the experiment's batch)")
    ap.add_argument("--control-blocks", type=int, default=3, help="base blocks copied")
    ap.add_argument("--per-caption", type=int, default=20, help="control maps (and samples) per held-out caption")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default="docs/bench_controlnet.json")
    ap.add_argument("--grid", default="docs/bench_controlnet.png")
    args = ap.parse_args(argv)
    square = args.experiment == "demo_controlnet"  # make demo's 16x16 stage 2; otherwise its stage 4 and the stretched canvases
    args.base = args.base or f"runs/demo/stage{2 if square else 4}/checkpoints/latest"
    args.canvases = args.canvases or (["16x16"] if square else ["24x48", "48x24"])
    args.run_dir = args.run_dir or f"runs/bench_{args.experiment.removeprefix('demo_')}"
    return args


def held_out_controls(per_caption: int, seed: int, height: int = 16, width: int = 16):
    """[(caption, image uint8, mask map)]: every held-out caption, ``per_caption`` renders each (random place)
    on a ``height`` x ``width`` canvas."""
    import dataclasses

    import numpy as np

    from data.control import mask
    from data.shapes import HELD_OUT_CAPTIONS, parse_caption, random_centre, random_spec, render

    rng = np.random.default_rng(seed)
    out = []
    for i in range(per_caption):
        for caption in HELD_OUT_CAPTIONS:
            spec = dataclasses.replace(random_spec(rng, width, height), **parse_caption(caption))
            spec = dataclasses.replace(spec, **random_centre(rng, spec.size, width, height))  # inside, for the caption's size
            image = render(spec, width, height, rng)
            out.append((caption, image, mask(image)))
    return out


def canvas(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise SystemExit(f"--canvases {text!r}: expected HEIGHTxWIDTH in pixels, e.g. 24x48") from None
    return h, w


def main(argv=None) -> dict:
    args = parse_args(argv)
    import numpy as np
    import torch

    from data.control import mask, mask_iou, to_pixels
    from data.evaluator import ShapesEvaluator
    from data.shapes import HELD_OUT_CAPTIONS, parse_caption
    from inference.conditioning import ControlPrompt
    from inference.images import save_png, to_uint8
    from inference.pipeline import Pipeline
    from models.checkpoint import resolve

    canvases = [canvas(c) for c in args.canvases]
    base_path = str(resolve(args.base))
    experiment = None if args.checkpoint else args.experiment  # a given checkpoint was trained however it was
    args.checkpoint, seconds = trained("controlnet", [
        f"experiment={args.experiment}", f"stage.init_from={base_path}", f"run_dir={args.run_dir}", f"train.max_steps={args.steps}",
        f"model.control_blocks={args.control_blocks}", f"seed={args.seed}", "train.sample_every=0",
        f"train.checkpoint_every={args.steps}"], args.checkpoint)
    net, base = Pipeline.load(args.checkpoint), Pipeline.load(base_path)
    settings = base.defaults()
    evaluator = ShapesEvaluator()

    def scores(images, items, sizes, other):
        pixels = to_uint8(images)
        acc = evaluator.score(images, [c for c, _, _ in items])
        masks = [mask(p) for p in pixels]
        iou = np.array([mask_iou(g, m) for g, (_, _, m) in zip(masks, items)])
        chance = np.array([mask_iou(g, m) for g, m in zip(masks, other)])
        by_size = {f"control_iou_{z}": float(iou[[s == z for s in sizes]].mean()) for z in sorted(set(sizes))}
        return {"control_iou": float(iou.mean()), **by_size, "control_iou_chance": float(chance.mean()),
                "caption_accuracy": float(acc.pop("all")), **{f"{k}_accuracy": float(v) for k, v in acc.items()}}

    per_canvas, grids, t_net = {}, [], 0.0
    for k, (h, w) in enumerate(canvases):
        items = held_out_controls(args.per_caption, args.seed + 1 + k, h, w)
        captions = [c for c, _, _ in items]
        values = [ControlPrompt(c, torch.from_numpy(to_pixels(m))) for c, _, m in items]
        t0 = time.time()
        controlled = net(values, settings, shape=net.latent_shape(h, w), batch_size=128)
        t_net += time.time() - t0
        plain = base(captions, settings, shape=base.latent_shape(h, w), batch_size=128)
        sizes = [parse_caption(c)["size"] for c in captions]
        other = [items[(i + len(HELD_OUT_CAPTIONS)) % len(items)][2] for i in range(len(items))]  # same caption, another render
        per_canvas[f"{h}x{w}"] = {"controlnet": scores(controlled, items, sizes, other),
                                  "base_without_control": scores(plain, items, sizes, other)}
        n_cols = min(12, len(items))
        maps = torch.stack([v.control for v in values[:n_cols]])
        grids.append(to_uint8(torch.cat([maps, controlled[:n_cols], plain[:n_cols]])))
        r = per_canvas[f"{h}x{w}"]
        print(f"{h}x{w}: ControlNet IoU {r['controlnet']['control_iou']:.3f}, caption accuracy {r['controlnet']['caption_accuracy']:.3f}; "
              f"base IoU {r['base_without_control']['control_iou']:.3f} (chance {r['base_without_control']['control_iou_chance']:.3f}), "
              f"caption accuracy {r['base_without_control']['caption_accuracy']:.3f}", flush=True)

    def mean(arm):  # every canvas has the same number of samples
        keys = per_canvas[next(iter(per_canvas))][arm]
        return {k: round(sum(c[arm][k] for c in per_canvas.values()) / len(per_canvas), 4) for k in keys}

    result_net, result_base = mean("controlnet"), mean("base_without_control")
    save_png(_stack(grids, n_cols), args.grid)
    copies = sum(p.numel() for n, p in net.model.named_parameters() if n.startswith("controlnet."))
    result = {
        "date": time.strftime("%Y-%m-%d"), "command": "python " + " ".join([sys.argv[0]] + (argv or sys.argv[1:])),
        "base": base_path, "base_step": base.meta["step"], "checkpoint": str(args.checkpoint), "experiment": experiment,
        "control": net.meta["conditioning"]["control"]["kind"],
        "control_blocks": net.meta["model_config"]["control_blocks"], "depth": net.meta["model_config"]["depth"],
        "controlnet_parameters": copies, "train_steps": net.meta["step"], "train_seconds": seconds,
        "canvases": args.canvases, "samples": args.per_caption * len(HELD_OUT_CAPTIONS) * len(canvases),
        "sampling": settings.to_dict(), "sampling_seconds_controlnet": round(t_net, 1),
        "controlnet": result_net, "base_without_control": result_base,
        "per_canvas": {c: {arm: {k: round(v, 4) for k, v in r.items()} for arm, r in arms.items()} for c, arms in per_canvas.items()},
        "caption_accuracy_change_points": round(100 * (result_net["caption_accuracy"] - result_base["caption_accuracy"]), 2),
        "grid_rows": [f"{c}: control maps (held-out images), ControlNet, base without control" for c in args.canvases],
    }
    print(f"ControlNet: control IoU {result_net['control_iou']:.3f} (chance {result_net['control_iou_chance']:.3f}), caption "
          f"accuracy {result_net['caption_accuracy']:.3f}; base without control: IoU {result_base['control_iou']:.3f} "
          f"(chance {result_base['control_iou_chance']:.3f}), caption accuracy {result_base['caption_accuracy']:.3f}"
          + (f"; trained {seconds:.0f} s" if seconds else ""))
    print(f"grid: {args.grid}")
    return write_json(result, args.json)


def _stack(grids: list, n_cols: int):
    """One picture of each canvas's three rows, the canvases one under another (widths padded white)."""
    import numpy as np

    from inference.images import make_grid

    parts = [make_grid(g, ncols=n_cols, upscale=3) for g in grids]
    width = max(p.shape[1] for p in parts)
    pad = [np.pad(p, ((0, 8), (0, width - p.shape[1]), (0, 0)), constant_values=255) for p in parts]
    return np.concatenate(pad)


if __name__ == "__main__":
    main()
