"""Score a checkpoint at given sampling settings: the shapes demo's evaluator, or FID / KID against real images.

    python scripts/evaluate_checkpoint.py runs/quality/stage1/checkpoints/step_0003500 --cfg 4 --steps 20
    python scripts/evaluate_checkpoint.py CKPT --cfg 2 4 6 --steps 10 20 40     # a sweep
    python scripts/evaluate_checkpoint.py runs/quality/stage2 --prompts held_out   # text: the held-out captions
    python scripts/evaluate_checkpoint.py runs/mine/stage1 --fid-reference datasets/mine_val --fid-weights pt_inception.pth --n 2000

Prints a table (EMA weights unless --raw) and writes a grid PNG per setting into the checkpoint
folder. Shapes demo, class checkpoints: class / shape / colour accuracy over every class; text
checkpoints: caption accuracy (every attribute the prompt names right) and per-attribute
accuracy, on the held-out demo captions or --prompts given. With --fid-reference (a shard folder
or a folder of images you did not train on): FID and KID of --n samples against it, CLIP score
with --clip-model, and the pinned setup (reference set, resize, weights) in the --out JSON
(data/fid.py). The same evaluation as the trainer's (inference/evaluation.py).
"""
from __future__ import annotations

import argparse
import sys
import itertools
import json
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # in place: the checkout's packages, not an install's
from models.cli import HelpFormatter, add_device_arguments  # noqa: E402


def main(argv=None) -> list[dict]:
    from flow.sampling import SOLVERS

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("checkpoint", help="a checkpoint directory or a run directory (its newest checkpoint)")
    ap.add_argument("--cfg", type=float, nargs="+", default=None,
                    help="guidance scales to try (a distilled student: the w it is asked for) (default: the checkpoint's)")
    ap.add_argument("--steps", type=int, nargs="+", default=None, help="solver step counts to try (default: the checkpoint's)")
    ap.add_argument("--solver", default=None, choices=SOLVERS, help="ODE solver, or dpm++ / ddim (diffusers' schedulers), or lcm (a distilled "
                    "student) (default: the checkpoint's)")
    ap.add_argument("--shift", type=float, default=None, help="timestep shift (default: the checkpoint's training shift)")
    ap.add_argument("--n", type=int, default=480, help="samples (cycled over the classes or prompts)")
    ap.add_argument("--prompts", nargs="+", default=None,
                    help="text checkpoints: prompts, or held_out (the demo's held-out captions); default: the checkpoint's "
                         "evaluation prompts, else held_out")
    ap.add_argument("--fid-reference", default=None, help="score FID and KID against these real images (shard folder or image folder)")
    ap.add_argument("--fid-weights", default=None,
                    help="Inception weights file (safetensors or a tensor-only .pth); default: torch-fidelity's own download")
    ap.add_argument("--fid-max-reference", type=int, default=5000, help="reference images used (the first, in sorted key order)")
    ap.add_argument("--clip-model", default=None, help="also CLIP score with this CLIP model (hub id or folder)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the initial noise")
    ap.add_argument("--raw", action="store_true", help="score the raw weights instead of the EMA")
    ap.add_argument("--size", type=int, nargs=2, metavar=("HEIGHT", "WIDTH"), default=None,
                    help="image size in pixels (mmDiT: any multiple of the patch, e.g. an aspect bucket); default: the trained size")
    add_device_arguments(ap)
    ap.add_argument("--out", default=None, help="JSON file for the results")
    args = ap.parse_args(argv)

    from data.evaluator import ShapesEvaluator, make_evaluator
    from data.shapes import HELD_OUT_CAPTIONS
    from inference.conditioning import ConditioningError
    from inference.evaluation import EvalSpec, evaluate
    from inference.pipeline import Pipeline

    pipe = Pipeline.load(args.checkpoint, use_ema=not args.raw, device=args.device, dtype=args.dtype)
    cond = pipe.conditioning
    if cond.kind == "control":  # each prompt needs its own control image: the held-out benchmark does that
        raise SystemExit(f"{args.checkpoint} is a ControlNet: score it with scripts/bench_controlnet.py --checkpoint "
                         f"{args.checkpoint} (held-out captions with control maps of rendered images), or sample it with "
                         "app/sample.py --control")
    if cond.choices() is None:  # free text: the prompts asked for
        if args.prompts is None:
            try:
                args.prompts = cond.default_inputs()  # the run's evaluation prompts
            except ConditioningError:
                args.prompts = ["held_out"]
        values = cond.parse(list(HELD_OUT_CAPTIONS) if args.prompts == ["held_out"] else args.prompts)
    else:
        values = cond.default_inputs()
    if args.fid_reference:
        ae = pipe.autoencoder
        evaluator = make_evaluator({"kind": "fid", "reference": args.fid_reference, "weights": args.fid_weights,
                                    "max_reference": args.fid_max_reference, "clip_model": args.clip_model},
                                   decode=lambda raw: ae.decode(ae.normalize(raw.to(pipe.device))))
    else:
        evaluator = ShapesEvaluator()
    try:
        shape = pipe.latent_shape(*args.size) if args.size else pipe.latent_shape()
    except ValueError as e:
        ap.error(f"--size: {e}")
    rows, keys = [], None
    own = pipe.defaults()
    for cfg_scale, steps in itertools.product(args.cfg or [own.cfg_scale], args.steps or [own.steps]):
        settings = pipe.defaults(steps=steps, cfg_scale=cfg_scale, solver=args.solver, shift=args.shift, seed=args.seed)
        tag = (f"_{shape[1]}x{shape[2]}" if args.size else "") + (f"_shift{settings.shift:g}" if args.shift is not None else "") + \
            ("_raw" if args.raw else "")  # one file per setting: a sweep never overwrites another's grid
        spec = EvalSpec(values, args.n, settings, shape, evaluator)
        result = evaluate(pipe.model, pipe.autoencoder, cond, spec, pipe.device, pipe.path / f"eval_cfg{cfg_scale}_steps{steps}{tag}.png")
        scores = {k: v for k, v in result.items() if isinstance(v, float)}
        if keys is None:
            keys = list(scores)
            print(f"| cfg | steps | {' | '.join(keys)} |\n|---|---|{'---|' * len(keys)}")
        n = args.n if args.fid_reference else max(args.n, 2 * len(values))
        rows.append({"checkpoint": str(pipe.path), "cfg_scale": cfg_scale, "steps": steps, "n": n, "latent_shape": list(shape), **scores,
                     **({"fid_setup": result["fid_setup"]} if "fid_setup" in result else {})})
        print(f"| {cfg_scale} | {steps} | {' | '.join(f'{scores[k]:.3f}' for k in keys)} |", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
