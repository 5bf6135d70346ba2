"""Carry a checkpoint's weights into the next curriculum stage.

    python reparameterize.py runs/demo/stage1/checkpoints/step_0004000 runs/demo/stage2_init --caption-channels 384

Transitions (picked from the source checkpoint's stage unless --transition says):
    1to2  ccDiT -> mmDiT: shared weights copied, adaLN folded into adaLN-single at --t-ref,
          cross-attention output zero (see models/reparam.py). Exact at t_ref for any text.
The output is an init checkpoint (model.safetensors + meta.json + report.json) that the
next stage's `stage.init_from` points at. Weights are read from safetensors only: a
checkpoint can never run code here.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

TRANSITIONS = {"stage1": "1to2"}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", help="checkpoint directory of the finished stage")
    ap.add_argument("out", help="directory to write the next stage's initialization to")
    ap.add_argument("--transition", default="auto", choices=["auto", "1to2"])
    ap.add_argument("--weights", default="ema", choices=["ema", "raw"], help="which weights of the source to carry")
    ap.add_argument("--caption-channels", type=int, help="1to2: width of the text encoder's hidden states")
    ap.add_argument("--t-ref", type=float, default=0.5, help="1to2: the time at which the fold is exact")
    ap.add_argument("--force", action="store_true", help="replace an existing output directory")
    args = ap.parse_args(argv)

    import torch
    from safetensors.torch import save_file

    from models.presets import build_model
    from models.reparam import ccdit_to_mmdit
    from training.checkpoint import FORMAT, CheckpointError, load_weights, read_meta

    meta = read_meta(args.source)
    transition = TRANSITIONS.get(meta["stage"]) if args.transition == "auto" else args.transition
    if transition is None:
        raise SystemExit(f"{args.source} is a {meta['stage']} checkpoint; no transition starts there (known: {TRANSITIONS})")
    if transition == "1to2":
        if meta["family"] != "ccdit":
            raise SystemExit(f"1to2 needs a stage-1 ccDiT checkpoint, but {args.source} holds a {meta['family']} ({meta['stage']})")
        if not args.caption_channels:
            raise SystemExit("1to2 needs --caption-channels: the text encoder's hidden size (e.g. 4096 for T5-XXL)")
    out = Path(args.out)
    if out.exists() and not args.force:
        raise SystemExit(f"{out} exists; pass --force to replace it")

    use_ema = args.weights == "ema" and meta.get("has_ema", False)
    try:
        src = build_model(meta["family"], meta["model_config"])
        src.load_state_dict(load_weights(args.source, ema=use_ema))
    except CheckpointError as e:
        raise SystemExit(str(e)) from e
    model, report = ccdit_to_mmdit(src.eval(), args.caption_channels, t_ref=args.t_ref)

    # how function-preserving was it? relative error vs the source with the null class, by t
    torch.manual_seed(0)
    c = model.config
    x = torch.randn(8, c.in_channels, c.input_size, c.input_size)
    text = torch.randn(8, 4, c.caption_channels)
    errors = {}
    with torch.no_grad():
        for t in sorted({0.1, 0.3, args.t_ref, 0.7, 0.9}):
            tt = torch.full((8,), t)
            a, b = model(x, tt, text), src(x, tt, torch.full((8,), src.null_class))
            errors[f"{t:g}"] = float((a - b).norm() / b.norm().clamp(min=1e-12))
    report.update(transition=transition, source=str(Path(args.source).resolve()), weights="ema" if use_ema else "raw",
                  relative_error_by_t=errors)

    from dataclasses import asdict

    new_meta = {
        "format": FORMAT,
        "stage": "stage2",
        "stage_index": 2,
        "kind": "init",
        "family": "mmdit",
        "preset": meta["preset"],
        "model_config": asdict(model.config),
        "step": 0,
        "has_ema": False,
        "code_revision": meta.get("code_revision"),
        "autoencoder": meta["autoencoder"],
        "conditioning": {"type": "text", "caption_channels": args.caption_channels},
        "sampling": meta.get("sampling"),
        "init": {"transition": transition, "source": report["source"], "source_step": meta["step"], "t_ref": args.t_ref},
    }
    tmp = out.with_name(f".tmp-{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp / "model.safetensors")
    (tmp / "meta.json").write_text(json.dumps(new_meta, indent=2))
    (tmp / "report.json").write_text(json.dumps(report, indent=2))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    print(f"{transition}: {len(report['copied'])} tensors copied, {len(report['folded'])} folded, {len(report['new'])} new")
    print("relative error vs the source (null class) by t: " + ", ".join(f"t={k}: {v:.2e}" for k, v in errors.items()))
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
