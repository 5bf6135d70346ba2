"""Sample a checkpoint from the command line: class ids or prompts -> PNG grid + JSON of every setting.

    python app/sample.py runs/quality/stage1 --classes 0 1 2 --per-class 4          # a run dir: its newest checkpoint
    python app/sample.py CKPT --classes all --cfg 4 --steps 20 --solver euler --seed 7 --out samples.png
    python app/sample.py runs/quality/stage2 --prompt "a small red circle on a black background" --per-class 8
    python app/sample.py runs/quality/stage2 --prompts-file prompts.txt --negative-prompt "a blue square"

The JSON written beside the PNG records the checkpoint, its step and every
setting, so the same command reproduces the same pixels. Uses the same
sampling function as the training previews (inference/pipeline.py).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_classes(spec: list[str], num_classes: int, names: list[str] | None) -> list[int]:
    if spec == ["all"]:
        return list(range(num_classes))
    out = []
    for s in spec:
        if s.isdigit():
            out.append(int(s))
        elif names and s.replace("_", " ") in names:
            out.append(names.index(s.replace("_", " ")))
        else:
            raise SystemExit(f"unknown class {s!r}: give ids 0..{num_classes - 1}" + (f" or names like {names[0].replace(' ', '_')!r}" if names else ""))
    bad = [c for c in out if not 0 <= c < num_classes]
    if bad:
        raise SystemExit(f"class ids {bad} are out of range 0..{num_classes - 1}")
    return out


def main(argv=None) -> dict:
    from flow.sampling import SOLVERS

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="a checkpoint directory (runs/<run>/checkpoints/step_XXXXXXX) or a run directory")
    ap.add_argument("--classes", nargs="+", default=["all"], help="class ids or names (e.g. red_circle), or 'all'")
    ap.add_argument("--prompt", action="append", help="text checkpoints: a prompt (repeat for several)")
    ap.add_argument("--prompts-file", help="text checkpoints: a file with one prompt per line")
    ap.add_argument("--negative-prompt", default="", help="text checkpoints: the CFG unconditional prompt (default: empty)")
    ap.add_argument("--per-class", type=int, default=4, help="samples per class or prompt (grid rows)")
    ap.add_argument("--cfg", type=float, default=None, help="guidance scale (default: the checkpoint's)")
    ap.add_argument("--steps", type=int, default=None, help="solver steps (default: the checkpoint's)")
    ap.add_argument("--solver", choices=SOLVERS, default=None)
    ap.add_argument("--shift", type=float, default=None, help="timestep shift (default: the checkpoint's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--raw", action="store_true", help="use the raw weights instead of the EMA")
    ap.add_argument("--out", default="samples.png", help="PNG path; the settings go to the same name with .json")
    args = ap.parse_args(argv)
    if args.steps is not None and not 1 <= args.steps <= 1000:
        raise SystemExit(f"--steps must be between 1 and 1000, got {args.steps}")

    import torch

    from inference.images import make_grid, save_png, to_uint8
    from inference.pipeline import SampleSettings, generate, latent_shape, load_model

    from inference.pipeline import prompt_conditions
    from training.checkpoint import CheckpointError
    from training.checkpoint import resolve as resolve_checkpoint

    try:
        model, ae, meta = load_model(args.checkpoint, use_ema=not args.raw)
    except (CheckpointError, ValueError) as e:
        raise SystemExit(str(e)) from e
    cond = meta["conditioning"]
    prompts = list(args.prompt or [])
    if args.prompts_file:
        prompts += [line.strip() for line in Path(args.prompts_file).read_text().splitlines() if line.strip()]
    if cond["type"] == "text" and not prompts:
        raise SystemExit(f"{args.checkpoint} is a text-conditioned ({meta['stage']}) checkpoint: give --prompt or --prompts-file")
    if cond["type"] == "class" and prompts:
        raise SystemExit(f"{args.checkpoint} is a class-conditioned ({meta['stage']}) checkpoint: give --classes, not prompts")
    d = meta["sampling"]
    settings = SampleSettings(
        steps=args.steps or d["steps"],
        cfg_scale=args.cfg if args.cfg is not None else d["cfg_scale"],
        solver=args.solver or d["solver"],
        shift=args.shift if args.shift is not None else d["shift"],
        seed=args.seed,
    )
    if cond["type"] == "class":
        k = cond["num_classes"]
        classes = parse_classes(args.classes, k, cond.get("class_names"))
        labels = torch.tensor([c for _ in range(args.per_class) for c in classes])
        c, u, columns = labels, torch.full_like(labels, k), len(classes)
    else:
        c, u = prompt_conditions(meta, [p for _ in range(args.per_class) for p in prompts], args.negative_prompt)
        columns = len(prompts)
    images = generate(model, ae, c, u, latent_shape(meta), settings)
    out = Path(args.out)
    save_png(make_grid(to_uint8(images), ncols=columns, upscale=max(1, 96 // images.shape[-1])), out)
    record = {
        "checkpoint": str(resolve_checkpoint(args.checkpoint).resolve()),
        "stage": meta["stage"],
        "step": meta["step"],
        "weights": "raw" if args.raw else "ema",
        **({"classes": classes, "class_names": [cond["class_names"][i] for i in classes] if cond.get("class_names") else None}
           if cond["type"] == "class" else {"prompts": prompts, "negative_prompt": args.negative_prompt}),
        "per_class": args.per_class,
        **settings.to_dict(),
    }
    out.with_suffix(".json").write_text(json.dumps(record, indent=2))
    print(f"wrote {out} ({images.shape[0]} samples) and {out.with_suffix('.json')}")
    return record


if __name__ == "__main__":
    main()
