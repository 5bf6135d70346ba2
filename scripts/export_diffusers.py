"""Export an mmDiT checkpoint (PixArt-α preset) to a diffusers ``PixArtTransformer2DModel`` folder.

    python scripts/export_diffusers.py runs/stage2/checkpoints/step_0100000 exported/transformer [--raw]

The folder loads with ``PixArtTransformer2DModel.from_pretrained(folder)``; our model takes
t in [0, 1], diffusers the timestep t * 1000 (what FlowMatchEulerDiscreteScheduler feeds
it). To sample in diffusers' PixArtAlphaPipeline, use
``models.diffusers_pixart.flow_scheduler()`` as its scheduler (see the README: with the
same latents, sigmas and embeddings it matches our sampler, tested). Checkpoints that diffusers can't represent exactly (ccDiT, QK-norm on, MLP ratio
other than 4, ...) are refused with the reason.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # in place: the checkout's packages, not an install's
from models.cli import HelpFormatter  # noqa: E402


def main(argv=None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("checkpoint", help="a checkpoint directory of an mmDiT stage")
    ap.add_argument("out", help="folder to write the diffusers transformer to")
    ap.add_argument("--raw", action="store_true", help="export the raw weights instead of the EMA")
    args = ap.parse_args(argv)

    from inference.pipeline import load_model
    from models.checkpoint import CheckpointError, read_meta
    from models.diffusers_pixart import IncompatibleModel, to_diffusers

    try:
        meta = read_meta(args.checkpoint)
    except CheckpointError as e:
        raise SystemExit(str(e)) from e
    if meta["family"] != "mmdit":
        raise SystemExit(f"{args.checkpoint} holds a {meta['family']} ({meta['stage']}); only mmDiT (text) checkpoints map onto PixArt")
    model, _, meta = load_model(args.checkpoint, use_ema=not args.raw)
    try:
        exported = to_diffusers(model)
    except IncompatibleModel as e:
        raise SystemExit(str(e)) from e
    out = Path(args.out)
    exported.save_pretrained(out)
    print(f"wrote {out} (PixArtTransformer2DModel, step {meta['step']}, {'raw' if args.raw else 'EMA'} weights)")
    return out


if __name__ == "__main__":
    main()
