"""Train the demo's ControlNet on mask maps and measure whether samples follow their control: the ControlNet proof.

    python scripts/bench_controlnet.py --base runs/demo/stage2/checkpoints/latest

Trains ``train_controlnet.py experiment=demo_controlnet`` (mask maps, copies of the first 3 of the
6 blocks, the stage-2 base frozen) unless --checkpoint names a trained one, then samples the demo's
held-out captions (never in any training data) with control maps derived from freshly rendered
held-out images: each caption with --per-caption maps of its object at random places and sizes.
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
    ap.add_argument("--base", default="runs/demo/stage2/checkpoints/latest", help="the frozen text checkpoint (make demo's stage 2)")
    ap.add_argument("--checkpoint", default=None, help="a trained ControlNet checkpoint: skip training (its time is read "
                                                         "from the run's summary.json beside it)")
    ap.add_argument("--run-dir", default="runs/bench_controlnet", help="the ControlNet run (resumed if it is there)")
    ap.add_argument("--steps", type=int, default=600, help="training steps (batch 64)")
    ap.add_argument("--control-blocks", type=int, default=3, help="base blocks copied")
    ap.add_argument("--per-caption", type=int, default=20, help="control maps (and samples) per held-out caption")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default="docs/bench_controlnet.json")
    ap.add_argument("--grid", default="docs/bench_controlnet.png")
    return ap.parse_args(argv)


def held_out_controls(per_caption: int, seed: int, size: int = 16):
    """[(caption, image uint8, mask map)]: every held-out caption, ``per_caption`` renders each (random place)."""
    import dataclasses

    import numpy as np

    from data.control import mask
    from data.shapes import HELD_OUT_CAPTIONS, parse_caption, random_spec, render

    rng = np.random.default_rng(seed)
    out = []
    for i in range(per_caption):
        for caption in HELD_OUT_CAPTIONS:
            spec = dataclasses.replace(random_spec(rng, size, size), **parse_caption(caption))
            spec = dataclasses.replace(spec, **_inside(spec, rng, size))
            image = render(spec, size, size, rng)
            out.append((caption, image, mask(image)))
    return out


def _inside(spec, rng, size: int) -> dict:
    """A centre that keeps the object (of the caption's size) inside the canvas, as the data generator does."""
    from data.shapes import SIZES

    half = SIZES[spec.size] * size / 2 + 1
    return {"cx": float(rng.uniform(half / size, 1 - half / size)), "cy": float(rng.uniform(half / size, 1 - half / size))}


def main(argv=None) -> dict:
    args = parse_args(argv)
    import numpy as np
    import torch

    from data.control import mask, mask_iou, to_pixels
    from data.evaluator import ShapesEvaluator
    from inference.conditioning import ControlPrompt
    from inference.images import make_grid, save_png, to_uint8
    from inference.pipeline import Pipeline
    from models.checkpoint import resolve

    base_path = str(resolve(args.base))
    args.checkpoint, seconds = trained("controlnet", [
        "experiment=demo_controlnet", f"stage.init_from={base_path}", f"run_dir={args.run_dir}", f"train.max_steps={args.steps}",
        f"model.control_blocks={args.control_blocks}", f"seed={args.seed}", "train.sample_every=0",
        f"train.checkpoint_every={args.steps}"], args.checkpoint)
    net, base = Pipeline.load(args.checkpoint), Pipeline.load(base_path)
    settings = base.defaults()
    evaluator = ShapesEvaluator()
    items = held_out_controls(args.per_caption, args.seed + 1)
    captions = [c for c, _, _ in items]
    values = [ControlPrompt(c, torch.from_numpy(to_pixels(m))) for c, _, m in items]
    t0 = time.time()
    controlled = net(values, settings, batch_size=256)
    t_net = time.time() - t0
    plain = base(captions, settings, batch_size=256)

    from data.shapes import HELD_OUT_CAPTIONS, parse_caption

    sizes = [parse_caption(c)["size"] for c in captions]
    other = [items[(i + len(HELD_OUT_CAPTIONS)) % len(items)][2] for i in range(len(items))]  # same caption, another render

    def scores(images):
        pixels = to_uint8(images)
        acc = evaluator.score(images, captions)
        masks = [mask(p) for p in pixels]
        iou = np.array([mask_iou(g, m) for g, (_, _, m) in zip(masks, items)])
        chance = np.array([mask_iou(g, m) for g, m in zip(masks, other)])
        by_size = {f"control_iou_{z}": round(float(iou[[s == z for s in sizes]].mean()), 4) for z in sorted(set(sizes))}
        return {"control_iou": round(float(iou.mean()), 4), **by_size, "control_iou_chance": round(float(chance.mean()), 4),
                "caption_accuracy": round(float(acc.pop("all")), 4), **{f"{k}_accuracy": round(float(v), 4) for k, v in acc.items()}}

    result_net, result_base = scores(controlled), scores(plain)
    n_cols = min(12, len(items))
    maps = torch.stack([v.control for v in values[:n_cols]])
    grid = make_grid(to_uint8(torch.cat([maps, controlled[:n_cols], plain[:n_cols]])), ncols=n_cols, upscale=4)
    save_png(grid, args.grid)
    copies = sum(p.numel() for n, p in net.model.named_parameters() if n.startswith("controlnet."))
    result = {
        "date": time.strftime("%Y-%m-%d"), "command": "python " + " ".join([sys.argv[0]] + (argv or sys.argv[1:])),
        "base": base_path, "base_step": base.meta["step"], "checkpoint": str(args.checkpoint), "control": net.meta["conditioning"]["control"]["kind"],
        "control_blocks": net.meta["model_config"]["control_blocks"], "depth": net.meta["model_config"]["depth"],
        "controlnet_parameters": copies, "train_steps": net.meta["step"], "train_seconds": seconds,
        "samples": len(items), "sampling": settings.to_dict(), "sampling_seconds_controlnet": round(t_net, 1),
        "controlnet": result_net, "base_without_control": result_base,
        "caption_accuracy_change_points": round(100 * (result_net["caption_accuracy"] - result_base["caption_accuracy"]), 2),
        "grid_rows": ["control maps (held-out images)", "ControlNet", "base, no control"],
    }
    print(f"ControlNet: control IoU {result_net['control_iou']:.3f} (chance {result_net['control_iou_chance']:.3f}), caption "
          f"accuracy {result_net['caption_accuracy']:.3f}; base without control: IoU {result_base['control_iou']:.3f} "
          f"(chance {result_base['control_iou_chance']:.3f}), caption accuracy {result_base['caption_accuracy']:.3f}"
          + (f"; trained {seconds:.0f} s" if seconds else ""))
    print(f"grid: {args.grid}")
    return write_json(result, args.json)


if __name__ == "__main__":
    main()
