"""Sample a checkpoint from the command line: class ids or prompts -> PNG grid, one PNG per sample, and a
JSON of every setting.

    python app/sample.py runs/quality/stage1 --classes 0 1 2 --per-class 4          # a run dir: its newest checkpoint
    python app/sample.py CKPT --classes all --cfg 4 --steps 20 --solver euler --seed 7 --out samples.png
    python app/sample.py runs/quality/stage2 --prompt "a small red circle on a black background" --per-class 8
    python app/sample.py runs/quality/stage2 --prompts-file prompts.txt --negative-prompt "a blue square"
    python app/sample.py runs/quality/stage4 --prompt "a large blue square on a white background" --height 24 --width 48
    python app/sample.py CKPT --prompt "..." --per-class 64 --batch 16 --device cuda --dtype bf16
    python app/sample.py runs/demo/controlnet --prompt "a large red circle on a white background" --control mask.png
    python app/sample.py runs/demo/controlnet --prompt "..." --control-from photo.png --control-scale 0.8

A ControlNet checkpoint (train_controlnet.py) needs a control image: --control, a map as a picture
(white = inside the mask, or the edges), or --control-from, an ordinary picture whose map of the
checkpoint's kind is derived here. Either is scaled to cover the output size and center-cropped;
the map used is written beside the grid (<out>_control.png).

Each sample is also written on its own, named by class or prompt and its row
(samples/red_circle_0.png, samples/a_small_red_circle_on_a_black_background_1.png, ...:
the folder is --out without .png unless --images says). The JSON written beside the
grid records the checkpoint, its step, every setting and the per-image files, so the
same command reproduces the same pixels (the batch size does not change them). Uses the same sampling function as the training previews
(inference/pipeline.py); the GPU when there is one.
"""
from __future__ import annotations

import argparse
import shlex
import sys
import json
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # in place: the checkout's packages, not an install's
from models.cli import HelpFormatter, add_device_arguments  # noqa: E402


def main(argv=None) -> dict:
    from flow.sampling import SOLVERS

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("checkpoint", help="a checkpoint directory (runs/<run>/checkpoints/step_XXXXXXX) or a run directory")
    ap.add_argument("--classes", nargs="+", default=None, help="class checkpoints: ids or names (e.g. red_circle), or 'all' (the default)")
    ap.add_argument("--prompt", action="append", help="text checkpoints: a prompt (repeat for several)")
    ap.add_argument("--prompts-file", help="text checkpoints: a file with one prompt per line")
    ap.add_argument("--negative-prompt", default="", help="text checkpoints: the CFG unconditional prompt (default: empty)")
    ap.add_argument("--control", default=None, metavar="PATH", help="ControlNet checkpoints: the control map as a picture")
    ap.add_argument("--control-from", default=None, metavar="PATH",
                    help="ControlNet checkpoints: a picture to derive the control map from (the checkpoint's kind: edges or mask)")
    ap.add_argument("--control-scale", type=float, default=None,
                    help="ControlNet checkpoints: the conditioning scale (0: the base model alone; default 1)")
    ap.add_argument("--per-class", type=int, default=4, help="samples per class or prompt (grid rows)")
    ap.add_argument("--cfg", type=float, default=None, help="guidance scale (default: the checkpoint's)")
    ap.add_argument("--steps", type=int, default=None, help="solver steps (default: the checkpoint's)")
    ap.add_argument("--solver", choices=SOLVERS, default=None, help="ODE solver, or dpm++ / ddim (diffusers' schedulers; what epsilon models such as imported PixArt use), or lcm (a "
                         "distilled few-step student, train_distill.py) (default: the checkpoint's)")
    ap.add_argument("--shift", type=float, default=None, help="timestep shift (default: the checkpoint's)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the initial noise")
    ap.add_argument("--height", type=int, default=None, help="image height in pixels (mmDiT: any multiple of the patch, e.g. a "
                                                               "stage-4 bucket; default: the trained size)")
    ap.add_argument("--width", type=int, default=None, help="image width in pixels (default: the trained size)")
    ap.add_argument("--batch", type=int, default=None, help="samples per forward pass (default: all at once)")
    add_device_arguments(ap)
    ap.add_argument("--raw", action="store_true", help="use the raw weights instead of the EMA")
    ap.add_argument("--out", default="samples.png", help="PNG path of the grid; the settings go to the same name with .json")
    ap.add_argument("--images", default=None, help="folder for the per-image PNGs (default: --out without .png; 'none': grid only)")
    args = ap.parse_args(argv)
    suffix = Path(args.out).suffix
    if suffix.lower() != ".png":  # before sampling, not after
        ap.error(f"--out {args.out!r}: the grid is written as a PNG; give a path ending in .png "
                 f"(e.g. {(args.out[: -len(suffix)] if suffix else args.out.rstrip('/')) or 'samples'}.png)")
    if args.steps is not None and not 1 <= args.steps <= 1000:
        raise SystemExit(f"--steps must be between 1 and 1000, got {args.steps}")
    if args.batch is not None and args.batch < 1:
        raise SystemExit(f"--batch must be at least 1, got {args.batch}")

    from inference.conditioning import ConditioningError
    from inference.images import make_grid, save_png, to_uint8
    from inference.pipeline import Pipeline
    from models.checkpoint import CheckpointError

    try:
        pipe = Pipeline.load(args.checkpoint, use_ema=not args.raw, device=args.device, dtype=args.dtype)
        shape = pipe.latent_shape(args.height, args.width) if args.height or args.width else pipe.latent_shape()
    except (CheckpointError, ConditioningError, ValueError, RuntimeError) as e:  # RuntimeError: a device torch can't use
        raise SystemExit(str(e)) from e
    cond = pipe.conditioning
    prompts = list(args.prompt or [])
    if args.prompts_file:
        prompts += [line.strip() for line in Path(args.prompts_file).read_text().splitlines() if line.strip()]
    text = cond.choices() is None  # free text: prompts; otherwise a fixed set to pick from
    if bool(prompts) != text or (text and args.classes):
        raise SystemExit(f"{args.checkpoint} is a {cond.kind}-conditioned ({pipe.meta['stage']}) checkpoint: "
                         + ("give --prompt or --prompts-file" if text else "give --classes, not prompts"))
    control = None
    if args.control and args.control_from:
        ap.error("give --control (a map) or --control-from (a picture to derive it from), not both")
    if (args.control or args.control_from) and cond.kind != "control":
        raise SystemExit(f"{args.checkpoint} is not a ControlNet checkpoint ({cond.kind}-conditioned): it takes no control image")
    if cond.kind == "control":
        source = args.control or args.control_from
        if not source:
            raise SystemExit(f"{args.checkpoint} is a ControlNet ({cond.control_kind} maps): give --control MAP.png or "
                             "--control-from PICTURE.png")
        try:
            from PIL import Image

            picture = Image.open(source)
            control = cond.control_image(picture, shape[1] * pipe.downsample, shape[2] * pipe.downsample,
                                         derive=bool(args.control_from))
        except OSError as e:
            raise SystemExit(f"cannot read the control image {source}: {e}") from e
        from inference.conditioning import ControlPrompt

        prompts = [ControlPrompt(p, control) for p in prompts]
    try:
        values = cond.parse(prompts or args.classes or ["all"])
    except ConditioningError as e:
        raise SystemExit(str(e)) from e
    settings = pipe.defaults(steps=args.steps, cfg_scale=args.cfg, solver=args.solver, shift=args.shift, seed=args.seed,
                             control_scale=args.control_scale)
    try:
        settings.objective.check_solver(settings.solver)
    except ValueError as e:
        ap.error(f"--solver: {e}")
    images = pipe([v for _ in range(args.per_class) for v in values], settings, negative=args.negative_prompt, shape=shape,
                  batch_size=args.batch)
    out = Path(args.out)
    pixels = to_uint8(images)
    save_png(make_grid(pixels, ncols=len(values), upscale=max(1, 96 // max(images.shape[-2:]))), out)
    files = []
    if control is not None:  # the map the samples followed, beside the grid
        control_png = out.with_name(out.stem + "_control.png")
        save_png(to_uint8(control[None])[0], control_png)
    if args.images != "none":
        folder = Path(args.images) if args.images else out.with_suffix("")
        folder.mkdir(parents=True, exist_ok=True)
        names = [file_stem(cond.describe(v)) for v in values]
        if len(set(names)) < len(names):  # prompts that differ only past the name's length
            names = [f"{j:02d}_{n}" for j, n in enumerate(names)]
        for i, tile in enumerate(pixels):  # row r = seed row, column = class or prompt (the grid's layout)
            path = folder / f"{names[i % len(values)]}_{i // len(values)}.png"
            save_png(tile, path)
            files.append(str(path))
    record = {
        "command": " ".join(shlex.quote(a) for a in ["python", "app/sample.py", *(sys.argv[1:] if argv is None else argv)]),
        "checkpoint": str(pipe.path.resolve()),
        "stage": pipe.meta["stage"],
        "step": pipe.meta["step"],
        "weights": "raw" if args.raw else "ema",
        **({"control": str(control_png), "control_from": args.control_from, "control_kind": cond.control_kind}
           if control is not None else {}),
        **({"prompts": [cond.describe(v) for v in values], "negative_prompt": args.negative_prompt} if text else
           {"classes": values, "class_names": [cond.describe(v) for v in values] if cond.class_names else None}),
        "per_class": args.per_class,
        "height": images.shape[-2],
        "width": images.shape[-1],
        "device": str(pipe.device),
        "dtype": args.dtype,
        **settings.to_dict(),
        "images": files,
    }
    out.with_suffix(".json").write_text(json.dumps(record, indent=2))
    print(f"wrote {out} ({images.shape[0]} samples)" + (f", {len(files)} images in {Path(files[0]).parent}/" if files else "")
          + (f", the control map used {control_png}" if control is not None else "") + f" and {out.with_suffix('.json')}")
    return record


def file_stem(text: str, limit: int = 60) -> str:
    """A file name from a class name or prompt: lower-case words joined by _, at most ``limit`` characters."""
    import re

    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:limit].rstrip("_") or "sample"


if __name__ == "__main__":
    main()
