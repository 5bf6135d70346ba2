"""Teach the demo's stage-2 model a concept it never saw, with LoRA, on the CPU: the fine-tuning proof.

    python scripts/bench_finetune.py --base runs/quality/stage2/checkpoints/latest   # make demo-quality's stage 2

The concept is a colour no demo data shows (purple, data/shapes.py NEW_COLOURS). The script renders
--images captioned purple shapes and trains two adapter runs from the same base and seed:
  lora        the images under their captions ("a large purple circle on a white background")
  dreambooth  DreamBooth-style instance prompts: the colour word is the identifier "sks"
              ("a large sks circle on a white background")
Both keep the base's prior (scripts/dreambooth_data.py): --class-images ordinary demo images with
their captions are trained on beside the new ones (``--prior generated``: the base's own samples of
those captions instead). Without a prior the adapters pull every colour toward purple. The folders go through data.prepare with the demo's text
encoder.
Each is scored by the shapes evaluator (reading purple): on every purple caption (the concept; for
dreambooth the prompts say "sks" and are scored as purple) and on the demo's held-out captions at
the base's sampling settings, against the base scored the same way in the same run. Writes
--json (numbers, settings, timings) and --grid (base / lora / dreambooth on the concept prompts).
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # in place: the checkout's packages, not an install's
from models.cli import HelpFormatter  # noqa: E402
from scripts.results import write_json  # noqa: E402

CONCEPT = "purple"
TOKEN = "sks"  # DreamBooth's rare identifier


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--base", default="runs/quality/stage2/checkpoints/latest",
                    help="the stage-2 checkpoint to adapt (make demo-quality's; make demo's quick one also works, and forgets more)")
    ap.add_argument("--work", default="runs/bench_finetune", help="folder for the images, shards and runs")
    ap.add_argument("--json", default="docs/bench_finetune.json")
    ap.add_argument("--grid", default="docs/bench_finetune.png")
    ap.add_argument("--arms", nargs="+", default=["lora", "dreambooth"], choices=["lora", "dreambooth"])
    ap.add_argument("--images", type=int, default=32, help="captioned images of the new concept")
    ap.add_argument("--class-images", type=int, default=256, help="prior-preservation images")
    ap.add_argument("--prior", choices=["real", "generated"], default="real",
                    help="class images: demo images of ordinary captions (real), or the base's samples of them (generated)")
    ap.add_argument("--instance-repeats", type=int, default=4, help="copies of each concept image in the training folder")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--targets", nargs="+", default=["cross_attn.to_v", "cross_attn.to_out"],
                    help="adapted layers: cross-attention's values (of the text) and its output projection")
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--min-lr-ratio", type=float, default=1.0, help="cosine decay to lr x this (1: constant after warmup)")
    ap.add_argument("--ema-decay", type=float, default=0.95)
    ap.add_argument("--concept-samples", type=int, default=144, help="samples over the 18 purple captions")
    ap.add_argument("--heldout-samples", type=int, default=240, help="samples over the demo's held-out captions")
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


def concept_captions(word: str = CONCEPT) -> list[str]:
    from data.shapes import BACKGROUNDS, SHAPES, SIZES, long_caption

    return [long_caption(s, word, z, b) for s, z, b in itertools.product(SHAPES, SIZES, BACKGROUNDS)]


def render_concept(folder: Path, n: int, seed: int, word: str) -> None:
    """n purple shapes (random shape, size, background, place) as PNGs with their caption (colour named ``word``)."""
    import dataclasses

    import numpy as np
    from PIL import Image

    from data.shapes import random_spec, render

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        spec = dataclasses.replace(random_spec(rng, 16, 16), colour=CONCEPT)
        Image.fromarray(render(spec, 16, 16, rng)).save(folder / f"{i:04d}.png")
        (folder / f"{i:04d}.txt").write_text(spec.caption.replace(CONCEPT, word) + "\n")


def render_prior(folder: Path, n: int, seed: int) -> Path:
    """n ordinary demo images (the demo's generator, held-out combinations left out) with their captions."""
    import numpy as np
    from PIL import Image

    from data.shapes import random_spec, render

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        spec = random_spec(rng, 16, 16)
        while spec.held_out:
            spec = random_spec(rng, 16, 16)
        Image.fromarray(render(spec, 16, 16, rng)).save(folder / f"{i:04d}.png")
        (folder / f"{i:04d}.txt").write_text(spec.caption + "\n")
    return folder


def prepare(folder: Path, out: Path, text_encoder: dict) -> Path:
    from data.prepare import main as prepare_main

    if not (out / "manifest.json").is_file():
        prepare_main(["--input", str(folder), "--out", str(out), "--size", "16", "--text-encoder", text_encoder["name"],
                      "--max-length", str(text_encoder["max_length"])])
    return out


def train_adapters(args, shards: Path, run_dir: Path) -> tuple[Path, float]:
    from training.config import compose
    from training.trainer import train

    targets = "[" + ",".join(args.targets) + "]"
    cfg = compose("stage2", ["data=shards", f"data.path={shards}", f"stage.init_from={args.base}", "model.preset=demo",
                             f"run_dir={run_dir}", f"seed={args.seed}", f"train.global_batch_size={args.batch}",
                             f"train.max_steps={args.steps}", f"train.lr={args.lr}", "train.warmup_steps=20",
                             f"train.min_lr_ratio={args.min_lr_ratio}", f"train.ema_decay={args.ema_decay}",
                             "train.ema_warmup=false", "train.sample_every=0", f"train.checkpoint_every={args.steps}",
                             "train.log_every=50", f"train.lora.rank={args.rank}", f"train.lora.target_modules={targets}",
                             "data.shuffle_buffer=64", "resume=auto"])
    start = time.time()
    summary = train(cfg)
    return Path(summary["checkpoint"]), time.time() - start


def score(pipe, prompts: list[str], descriptions: list[str], n: int, settings, evaluator) -> tuple[dict, "torch.Tensor"]:
    """The trainer's evaluation order: prompt i % len, noise for all n from the seed; scored against ``descriptions``."""
    chosen = [prompts[i % len(prompts)] for i in range(n)]
    described = [descriptions[i % len(prompts)] for i in range(n)]
    images = pipe(pipe.conditioning.parse(chosen), settings, batch_size=256)
    result = evaluator.score(images, described)
    return {k: round(float(v), 4) for k, v in result.items()}, images


def main(argv=None) -> dict:
    args = parse_args(argv)
    import numpy as np
    import torch

    from data.evaluator import ShapesEvaluator
    from data.shapes import HELD_OUT_CAPTIONS
    from inference.images import make_grid, save_png, to_uint8
    from inference.pipeline import Pipeline
    from models.adapters import adapter_fraction
    from models.checkpoint import resolve

    torch.set_num_threads(max(1, torch.get_num_threads()))
    args.base = str(resolve(args.base))
    work = Path(args.work)
    evaluator = ShapesEvaluator(new_colours=True)
    base = Pipeline.load(args.base)
    settings = base.defaults()
    text_encoder = base.meta["conditioning"]["text_encoder"]
    concept, heldout = concept_captions(), list(HELD_OUT_CAPTIONS)

    def evaluate(pipe, word):
        c, c_img = score(pipe, concept_captions(word), concept, args.concept_samples, settings, evaluator)
        h, _ = score(pipe, heldout, heldout, args.heldout_samples, settings, evaluator)
        return {"concept": c, "heldout": h}, c_img[: len(concept)]

    t0 = time.time()
    cached = work / "base_eval.pt"  # the base's scores do not change between runs of the same settings
    key = [args.base, args.concept_samples, args.heldout_samples, settings.to_dict()]
    saved = torch.load(cached, weights_only=True) if cached.is_file() else None
    if saved is not None and saved["key"] == json.dumps(key):
        base_scores, base_row = saved["scores"], saved["row"]
    else:
        base_scores, base_row = evaluate(base, CONCEPT)
        work.mkdir(parents=True, exist_ok=True)
        torch.save({"key": json.dumps(key), "scores": base_scores, "row": base_row}, cached)
    print(f"base: concept colour {base_scores['concept']['colour']:.3f}, caption {base_scores['concept']['all']:.3f}; "
          f"held-out caption {base_scores['heldout']['all']:.3f} ({time.time() - t0:.0f} s)", flush=True)
    from data.shapes import BACKGROUNDS, COLOURS, SHAPES, SIZES, long_caption
    from scripts.dreambooth_data import main as dreambooth_data

    ordinary = [long_caption(*c) for c in itertools.product(SHAPES, COLOURS, SIZES, BACKGROUNDS)]
    ordinary = [c for c in ordinary if c not in HELD_OUT_CAPTIONS]  # the prior: what the demo trained on
    prior_prompts = [ordinary[i] for i in np.random.default_rng(args.seed).permutation(len(ordinary))]
    rows, arms = [base_row], {}
    for arm in args.arms:
        word = CONCEPT if arm == "lora" else TOKEN
        folder = work / f"{arm}_images"
        if not (folder / "dreambooth.json").is_file():
            render_concept(work / f"{arm}_concept", args.images, args.seed, word)
            prior = ["--class-dir", str(render_prior(work / "prior_real", args.class_images, args.seed + 1))] \
                if args.prior == "real" else \
                ["--base", args.base, "--num-class-images", str(args.class_images), "--seed", str(args.seed + 1)] \
                + [x for p in prior_prompts for x in ("--class-prompt", p)]
            dreambooth_data(["--instance-dir", str(work / f"{arm}_concept"), "--out", str(folder), "--device", "cpu",
                             "--instance-repeats", str(args.instance_repeats)] + prior)
        shards = prepare(folder, work / f"{arm}_shards", text_encoder)
        ckpt, seconds = train_adapters(args, shards, work / f"{arm}_run")
        pipe = Pipeline.load(ckpt)
        trained, frozen = adapter_fraction(pipe.model)
        scores, row = evaluate(pipe, word)
        rows.append(row)
        arms[arm] = {"train_seconds": round(seconds, 1), "adapter_parameters": trained, "base_parameters": frozen,
                     "adapter_fraction": round(trained / frozen, 5), **scores,
                     "heldout_drop_points": round(100 * (base_scores["heldout"]["all"] - scores["heldout"]["all"]), 2),
                     "checkpoint": str(ckpt), "prompt_word": word}
        print(f"{arm}: {seconds:.0f} s training; adapters {trained} = {100 * trained / frozen:.2f}% of {frozen}; concept colour "
              f"{scores['concept']['colour']:.3f}, caption {scores['concept']['all']:.3f}; held-out caption "
              f"{scores['heldout']['all']:.3f} (base {base_scores['heldout']['all']:.3f})", flush=True)
    grid = make_grid(to_uint8(torch.cat(rows)), ncols=len(concept), upscale=4)
    save_png(grid, args.grid)
    result = {"date": time.strftime("%Y-%m-%d"), "command": "python " + " ".join([sys.argv[0]] + (argv or sys.argv[1:])),
              "base": args.base, "base_step": base.meta["step"], "concept": CONCEPT, "images": args.images,
              "class_images": args.class_images, "prior": args.prior, "instance_repeats": args.instance_repeats, "rank": args.rank, "targets": args.targets, "steps": args.steps,
              "batch": args.batch, "lr": args.lr, "min_lr_ratio": args.min_lr_ratio, "ema_decay": args.ema_decay, "sampling": settings.to_dict(), "concept_samples": args.concept_samples,
              "heldout_samples": args.heldout_samples, "base_scores": base_scores, "arms": arms,
              "grid_rows": ["base"] + args.arms}
    print(f"grid: {args.grid}")
    return write_json(result, args.json)


if __name__ == "__main__":
    main()
