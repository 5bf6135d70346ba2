"""Import a diffusers PixArt-α / PixArt-Σ transformer as one of our checkpoints, to fine-tune or sample.

    python scripts/import_pixart.py PixArt-alpha/PixArt-XL-2-512x512 runs/pixart512_init \\
        --subfolder transformer --vae stabilityai/sd-vae-ft-ema --text-encoder google/t5-v1_1-xxl
    python scripts/import_pixart.py /models/PixArt-Sigma-XL-2-1024-MS runs/sigma_init   # a pipeline root

SOURCE is a transformer folder, a hub id (with --subfolder transformer for a pipeline repo), or a
pipeline root on disk (its transformer/, vae/ and scheduler/ are read). The output is an init
checkpoint (model.safetensors + meta.json + report.json) that `stage.init_from` points at, and that
the sampler, the app and the evaluator load directly. It records:
  - the objective: DDPM noise prediction (epsilon) on the source scheduler's beta schedule (PixArt's
    1000 linear steps, 1e-4 to 0.02, when it has none), so training and sampling continue what the
    weights learned; sampling defaults are DPM-Solver++, 20 steps, guidance 4.5 (PixArt's);
  - the learned-variance channels (8 outputs for 4 latent channels): kept, and read as PixArt's
    fine-tuning scripts do (the first 4 are the noise; see docs/finetune.md);
  - stage 4 for models with PixArt-MS size / aspect micro-conditions (PixArt-α 1024-MS), else stage 2;
  - provenance: the source, its config and the sha256 of its weights.
What cannot map onto our mmDiT is refused with the reason. The comparison against the source's own
output is printed (relative error on random inputs). Nothing here runs code from the files it reads.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # in place: the checkout's packages, not an install's
from models.cli import HelpFormatter  # noqa: E402

PIXART_SAMPLING = {"steps": 20, "cfg_scale": 4.5, "solver": "dpm++", "shift": 1.0, "seed": 0}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("source", help="diffusers PixArt transformer: a folder, a pipeline root, or a hub id")
    ap.add_argument("out", help="the checkpoint folder to write")
    ap.add_argument("--subfolder", default=None, help="the transformer's subfolder (a pipeline root on disk: transformer)")
    ap.add_argument("--vae", default=None,
                    help="the autoencoder (hub id or folder) the model was trained with (default: a pipeline root's vae/; "
                         "PixArt-α used stabilityai/sd-vae-ft-ema, PixArt-Σ the SDXL VAE)")
    ap.add_argument("--vae-subfolder", default=None, help="the autoencoder's subfolder (default: vae for a pipeline root)")
    ap.add_argument("--text-encoder", default=None,
                    help="the text encoder for sampling (hub id or folder, e.g. google/t5-v1_1-xxl); a fine-tune takes "
                         "the one its shards were prepared with")
    ap.add_argument("--max-length", type=int, default=120, help="prompt tokens for sampling (PixArt-α 120, PixArt-Σ 300)")
    ap.add_argument("--stage", type=int, choices=(2, 3, 4, 5), default=None,
                    help="the curriculum stage it counts as (default: 4 with micro-conditions, else 2)")
    return ap.parse_args(argv)


def weights_digest(model) -> str:
    """sha256 over the state dict's names, shapes and bytes, in sorted order: provenance for the meta."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(tensor.shape)).encode())
        h.update(tensor.detach().float().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def scheduler_schedule(source: str, subfolder: str | None) -> dict:
    """The beta schedule of the source pipeline's scheduler, where there is one on disk; else PixArt's."""
    from flow.objectives import PIXART_SCHEDULE

    root = Path(source)
    if subfolder:
        root = root / subfolder / ".."
    path = root / "scheduler" / "scheduler_config.json"
    if not path.is_file():
        return dict(PIXART_SCHEDULE)
    cfg = json.loads(path.read_text())
    if cfg.get("prediction_type", "epsilon") != "epsilon":
        raise SystemExit(f"{path}: prediction_type {cfg['prediction_type']!r}; PixArt-α/Σ predict epsilon")
    return {k: cfg.get(k, v) for k, v in PIXART_SCHEDULE.items()}


def autoencoder_meta(args) -> tuple[dict, int]:
    """The meta of the autoencoder the model was trained with, and its downsampling (pixels per latent)."""
    from diffusers import AutoencoderKL

    name, sub = args.vae, args.vae_subfolder
    if name is None:
        root = Path(args.source)
        if not (root / "vae" / "config.json").is_file():
            raise SystemExit("--vae is needed: the autoencoder the model was trained with (the source is not a pipeline root "
                             "with a vae/ folder); PixArt-α: stabilityai/sd-vae-ft-ema, PixArt-Σ: the SDXL VAE")
        name, sub = str(root.resolve()), sub or "vae"
    try:
        cfg = AutoencoderKL.load_config(name, **({"subfolder": sub} if sub else {}))
    except OSError as e:
        raise SystemExit(f"--vae {name}: {e}") from e
    return {"name": name, "subfolder": sub, "scaling_factor": float(cfg["scaling_factor"]),
            "shift_factor": float(cfg.get("shift_factor") or 0.0)}, 2 ** (len(cfg["block_out_channels"]) - 1)


def compare(model, pixart, generator_seed: int = 0) -> float:
    """Relative error of our model against the source on a random batch (the MS micro-conditions included)."""
    import torch

    c = model.config
    g = torch.Generator().manual_seed(generator_seed)
    size = max(2 * c.patch_size, 8 // c.patch_size * c.patch_size)
    x = torch.randn(2, c.in_channels, size, size, generator=g)
    text = torch.randn(2, 6, c.caption_channels, generator=g)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 4:] = False
    t = torch.tensor([0.25, 0.8])
    res = torch.tensor([[size * 8.0, size * 8.0]] * 2)
    ar = torch.ones(2, 1)
    with torch.no_grad():
        ours = model(x, t, text, mask, resolution=res, aspect_ratio=ar)
        theirs = pixart(x, encoder_hidden_states=text, timestep=t * 1000, encoder_attention_mask=mask.long(),
                        added_cond_kwargs={"resolution": res, "aspect_ratio": ar}).sample
    return float((ours - theirs).norm() / theirs.norm().clamp(min=1e-12))


def main(argv=None) -> dict:
    args = parse_args(argv)
    from flow.objectives import Objective
    from models.checkpoint import checkpoint_meta, write_checkpoint
    from models.diffusers_pixart import IncompatibleModel, from_diffusers, load_transformer

    autoencoder, downsample = autoencoder_meta(args)
    try:
        pixart = load_transformer(args.source, args.subfolder).eval()
        model = from_diffusers(pixart, pixels_per_latent=downsample).eval()  # micro-conditions are in pixels
    except IncompatibleModel as e:
        raise SystemExit(str(e)) from e
    config = model.config
    error = compare(model, pixart)
    objective = Objective("epsilon", **scheduler_schedule(args.source, args.subfolder))
    stage = args.stage or (4 if config.micro_conditions else 2)
    width = config.caption_channels
    conditioning = {"type": "text", "caption_channels": width}
    if args.text_encoder:
        conditioning = {"type": "text", "text_encoder": {"name": args.text_encoder, "max_length": args.max_length, "width": width},
                        "caption_names": ["caption"]}
    source = {"source": args.source, "subfolder": args.subfolder, "diffusers_config": dict(pixart.config),
              "weights_sha256": weights_digest(pixart)}
    meta = checkpoint_meta(stage=f"stage{stage}", stage_index=stage, family="mmdit", preset="PixArt-alpha-XL/2",
                           model_config=asdict(config), autoencoder=autoencoder, conditioning=conditioning,
                           sampling=dict(PIXART_SAMPLING), objective=objective.to_meta(), kind="init", step=0,
                           init={"transition": "import", **{k: v for k, v in source.items() if k != "diffusers_config"}},
                           imported_from=json.loads(json.dumps(source, default=str)))
    report = {"relative_error": error, "stage": stage, "objective": objective.to_meta(), **source}
    write_checkpoint(args.out, meta, model, files={"report.json": json.dumps(report, indent=2, default=str)})
    n = sum(p.numel() for p in model.parameters())
    print(f"imported {args.source}: {n / 1e6:.1f}M parameters, {config.in_channels} -> {model.out_channels} channels"
          f"{' (learned variance)' if model.out_channels == 2 * config.in_channels else ''}, "
          f"{'with' if config.micro_conditions else 'without'} size micro-conditions, as stage {stage}; "
          f"relative error against diffusers {error:.1e}")
    print(f"objective: DDPM epsilon ({objective.num_train_timesteps} steps, {objective.beta_schedule} betas "
          f"{objective.beta_start}-{objective.beta_end}); sampling defaults {PIXART_SAMPLING}")
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
