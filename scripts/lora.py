"""LoRA checkpoints: merge the adapters into their base, or export them for diffusers.

    python scripts/lora.py info  runs/lora/checkpoints/latest
    python scripts/lora.py merge runs/lora/checkpoints/latest runs/lora_merged
    python scripts/lora.py peft  runs/lora/checkpoints/latest exported/lora_adapter [--base-out exported/transformer]

An adapter run (train.lora.rank > 0) saves only the adapters; its meta names the base checkpoint and
the sha256 of the base's weights, and loading refuses a base that changed. ``merge`` writes a
plain checkpoint (W + scale * B A folded into each adapted linear) that samples, evaluates,
fine-tunes and exports like any other, without the base. ``peft`` writes a PEFT adapter folder that
``PeftModel.from_pretrained(PixArtTransformer2DModel.from_pretrained(BASE), FOLDER)`` loads
(diffusers' PixArt names); ``--base-out`` also exports the base transformer it belongs to. EMA
adapters are used unless --raw.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # in place: the checkout's packages, not an install's
from models.cli import HelpFormatter  # noqa: E402


def _load(path: str, raw: bool):
    from models.checkpoint import CheckpointError, checkpoint_model, read_meta, resolve

    try:
        meta = read_meta(path)
        if not meta.get("adapter"):
            raise SystemExit(f"{path} is not an adapter checkpoint (its run had train.lora.rank=0): nothing to merge")
        return resolve(path), meta, checkpoint_model(path, meta, use_ema=not raw)
    except CheckpointError as e:
        raise SystemExit(str(e)) from e


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="the adapters: settings, size, base", formatter_class=HelpFormatter)
    info.add_argument("checkpoint", help="an adapter run's checkpoint (or its run directory)")
    merge = sub.add_parser("merge", help="fold the adapters into the base: a standalone checkpoint", formatter_class=HelpFormatter)
    merge.add_argument("checkpoint", help="an adapter run's checkpoint (or its run directory)")
    merge.add_argument("out", help="the merged checkpoint folder to write")
    peft = sub.add_parser("peft", help="a PEFT adapter folder for diffusers' PixArtTransformer2DModel", formatter_class=HelpFormatter)
    peft.add_argument("checkpoint", help="an adapter run's checkpoint (or its run directory)")
    peft.add_argument("out", help="the PEFT adapter folder to write")
    peft.add_argument("--base-out", default=None, help="also export the base transformer (diffusers format) here")
    for p in (merge, peft):
        p.add_argument("--raw", action="store_true", help="the raw adapters instead of their EMA")
    args = ap.parse_args(argv)

    from models.adapters import LoraSpec, adapter_fraction, merge as merge_model, peft_folder

    path, meta, model = _load(args.checkpoint, getattr(args, "raw", False))
    adapter = meta["adapter"]
    spec = LoraSpec.from_config(adapter)
    if args.command == "info":
        trained, frozen = adapter_fraction(model)
        out = {"rank": spec.rank, "alpha": spec.alpha, "target_modules": spec.target_modules, "adapter_parameters": trained,
               "base_parameters": frozen, "fraction": trained / frozen, "base": adapter["base"], "step": meta["step"]}
        print(json.dumps(out, indent=2))
        return out
    if args.command == "merge":
        from models.checkpoint import write_checkpoint

        merged = merge_model(model)
        new_meta = {k: v for k, v in meta.items() if k not in ("adapter", "has_ema")}
        new_meta.update(kind="merged", merged_from={"checkpoint": str(path.resolve()), "adapter": adapter,
                                                   "weights": "raw" if args.raw else "ema"})
        write_checkpoint(args.out, new_meta, merged)
        print(f"merged rank-{spec.rank} adapters of {path} into {adapter['base']['path']}: wrote {args.out}")
        return Path(args.out)
    from models.diffusers_pixart import IncompatibleModel, to_diffusers

    try:
        peft_folder(model, spec, args.out)
        if args.base_out:
            from models.adapters import merge_copy_base

            to_diffusers(merge_copy_base(model)).save_pretrained(args.base_out)
    except IncompatibleModel as e:
        raise SystemExit(str(e)) from e
    print(f"wrote {args.out} (PEFT LoRA, rank {spec.rank})" + (f" and the base transformer {args.base_out}" if args.base_out else ""))
    print(f"load: PeftModel.from_pretrained(PixArtTransformer2DModel.from_pretrained({args.base_out or 'BASE'!r}), {args.out!r})")
    return Path(args.out)


if __name__ == "__main__":
    main()
