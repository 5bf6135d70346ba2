"""Export an mmDiT checkpoint (PixArt block) to diffusers: the transformer, or a whole pipeline.

    python scripts/export_diffusers.py runs/stage2/checkpoints/latest exported/transformer
    python scripts/export_diffusers.py runs/stage2/checkpoints/latest exported/pipeline --pipeline

The transformer folder loads with ``PixArtTransformer2DModel.from_pretrained(folder)``. With
``--pipeline`` the folder is a ``PixArtAlphaPipeline`` that ``DiffusionPipeline.from_pretrained(folder)``
loads and runs: the transformer, a DPM-Solver++ scheduler set for what the checkpoint predicts
(flow velocity on the flow sigmas with the checkpoint's shift, or DDPM noise on its beta
schedule; it reloads as itself, and gives the latents our sampler gives with ``--solver dpm++``),
copies of the autoencoder and the text encoder with its tokenizer, and a model card (README.md)
with the training config and the run's evaluation numbers. Adapter (LoRA) checkpoints are merged
first. Stage-4/5 checkpoints export with their size micro-conditions when they use PixArt-MS's
layout. Pixel-space models (the demo's) have no autoencoder: load with
``from_pretrained(folder, vae=None)`` and call with ``output_type="latent"`` and height/width 8x the
image size (the pipeline assumes an 8x VAE); the "latents" are the images in [-1, 1]. Checkpoints diffusers can't represent exactly (ccDiT, QK-norm
on, MLP ratio other than 4, ...) are refused with the reason.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # in place: the checkout's packages, not an install's
from models.cli import HelpFormatter  # noqa: E402


def scheduler_for(meta: dict):
    """The diffusers scheduler a pipeline of this checkpoint samples with (flow/objectives.py)."""
    from flow.objectives import Objective

    return Objective.from_meta(meta.get("objective")).scheduler("dpm++", float((meta.get("sampling") or {}).get("shift", 1.0)))


def model_card(ckpt: Path, meta: dict, weights: str) -> str:
    """README.md of an exported pipeline: what it is, how it was trained, how it scored."""
    run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else None
    summary = {}
    if run_dir is not None and (run_dir / "summary.json").is_file():
        summary = {k: v for k, v in json.loads((run_dir / "summary.json").read_text()).items() if k.startswith("eval_")}
    config = (ckpt / "config.yaml").read_text() if (ckpt / "config.yaml").is_file() else "(not recorded: an init or imported checkpoint)"
    objective = (meta.get("objective") or {"kind": "flow"})["kind"]
    lines = [
        "---", "library_name: diffusers", "pipeline_tag: text-to-image", "tags: [pixart, flowdit]", "---", "",
        f"# {meta['stage']} mmDiT, step {meta['step']}", "",
        f"Exported from `{ckpt}` ({weights} weights, code revision {meta.get('code_revision')}). "
        f"It predicts {'the rectified-flow velocity' if objective == 'flow' else 'DDPM noise (epsilon)'}; the scheduler is "
        "DPM-Solver++ set for that.", "",
        "```python", "from diffusers import DiffusionPipeline", "pipe = DiffusionPipeline.from_pretrained(FOLDER)",
        f"image = pipe(\"a prompt\", num_inference_steps={(meta.get('sampling') or {}).get('steps', 20)}, "
        f"guidance_scale={(meta.get('sampling') or {}).get('cfg_scale', 4.0)}, clean_caption=False, "
        f"max_sequence_length={((meta.get('conditioning') or {}).get('text_encoder') or {}).get('max_length', 120)}).images[0]",
        "```", "",
        "## Evaluation", "",
    ]
    if summary:
        lines += ["| metric | value |", "|---|---|"] + [f"| {k[5:]} | {v:.4f} |" if isinstance(v, float) else f"| {k[5:]} | {v} |"
                                                       for k, v in summary.items()]
    else:
        lines.append("No evaluation was recorded with this checkpoint's run.")
    lines += ["", "## Training config", "", "```yaml", config.rstrip(), "```", ""]
    return "\n".join(lines)


def export_pipeline(ckpt: Path, meta: dict, model, autoencoder, out: Path, weights: str) -> Path:
    from diffusers import PixArtAlphaPipeline

    from inference.conditioning import from_meta
    from models.diffusers_pixart import to_diffusers

    te = (meta.get("conditioning") or {}).get("text_encoder")
    if not te:
        raise SystemExit(f"{ckpt} names no text encoder (an init checkpoint): a pipeline needs one; export a trained "
                         "stage, or the transformer alone (without --pipeline)")
    encoder = from_meta(meta).encoder.encoder  # the frozen TextEncoder behind the cache
    vae = getattr(autoencoder, "vae", None)  # None in pixel space
    pipe = PixArtAlphaPipeline(tokenizer=encoder.tokenizer, text_encoder=encoder.model, vae=vae,
                               transformer=to_diffusers(model), scheduler=scheduler_for(meta))
    pipe.save_pretrained(out)
    (out / "README.md").write_text(model_card(ckpt, meta, weights))
    return out


def main(argv=None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("checkpoint", help="a checkpoint directory of an mmDiT stage")
    ap.add_argument("out", help="folder to write the diffusers transformer (or, with --pipeline, the pipeline) to")
    ap.add_argument("--pipeline", action="store_true", help="write a whole PixArtAlphaPipeline folder, not the transformer alone")
    ap.add_argument("--raw", action="store_true", help="export the raw weights instead of the EMA")
    args = ap.parse_args(argv)

    from inference.pipeline import load_model
    from models.adapters import merge
    from models.checkpoint import CheckpointError, read_meta, resolve
    from models.diffusers_pixart import IncompatibleModel, to_diffusers

    try:
        meta = read_meta(args.checkpoint)
        if meta["family"] != "mmdit":
            raise SystemExit(f"{args.checkpoint} holds a {meta['family']} ({meta['stage']}); only mmDiT (text) checkpoints map onto PixArt")
        model, autoencoder, meta = load_model(args.checkpoint, use_ema=not args.raw)
    except CheckpointError as e:
        raise SystemExit(str(e)) from e
    if meta.get("adapter"):
        model = merge(model)
    weights = "raw" if args.raw else "EMA"
    out = Path(args.out)
    try:
        if args.pipeline:
            export_pipeline(resolve(args.checkpoint), meta, model, autoencoder, out, weights)
        else:
            to_diffusers(model).save_pretrained(out)
    except IncompatibleModel as e:
        raise SystemExit(str(e)) from e
    what = "PixArtAlphaPipeline" if args.pipeline else "PixArtTransformer2DModel"
    print(f"wrote {out} ({what}, step {meta['step']}, {weights} weights{', LoRA merged' if meta.get('adapter') else ''})")
    return out


if __name__ == "__main__":
    main()
