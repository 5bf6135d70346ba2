"""A small self-supervised vision encoder for the shapes demo, so that REPA (train.repa) can be tried
with no hub: a DINOv2-shaped ViT trained by masked image modelling (SimMIM: a share of the patches
replaced by a mask token, their pixels regressed by a linear head), on shapes images of its own
seed, without labels. It is saved like any transformers encoder (save_pretrained) and loaded by
folder:

    python scripts/train_demo_encoder.py --out runs/encoders/shapes-mim
    python train_stage1.py experiment=demo train.repa.encoder=runs/encoders/shapes-mim train.repa.projector_dim=256 \
        run_dir=runs/quality/stage1_repa

Its inputs are what REPA gives it on the demo: 16-pixel images resized to the model's 8x8 token grid
times --patch pixels, normalized with ImageNet's mean and std (models/vision_encoder.py).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # in place: the checkout's packages, not an install's
from models.cli import HelpFormatter  # noqa: E402


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--out", required=True, help="the folder to save the encoder in (config.json and weights)")
    ap.add_argument("--steps", type=int, default=2000, help="optimizer steps (about 5 minutes on 2 CPU cores)")
    ap.add_argument("--batch", type=int, default=96, help="images per step")
    ap.add_argument("--images", type=int, default=30000, help="shapes images rendered once, seed --seed")
    ap.add_argument("--image-size", type=int, default=16, help="pixels of the rendered images (the demo's)")
    ap.add_argument("--grid", type=int, default=8, help="tokens per side the encoder's patches fall on (the demo model's 16 / 2)")
    ap.add_argument("--patch", type=int, default=4, help="the encoder's patch size: it sees grid x patch pixels")
    ap.add_argument("--width", type=int, default=96, help="the ViT's hidden size")
    ap.add_argument("--depth", type=int, default=4, help="its layers")
    ap.add_argument("--heads", type=int, default=4, help="its attention heads")
    ap.add_argument("--mask", type=float, default=0.5, help="share of the patches masked per image")
    ap.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (200 warm-up steps, cosine to 0)")
    ap.add_argument("--seed", type=int, default=1234, help="of the images and the weights (the demo's data use seed 0)")
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    import numpy as np
    import torch
    import torch.nn.functional as F
    from transformers import Dinov2Config, Dinov2Model

    from data.shapes import make_sample
    from models.vision_encoder import IMAGENET_MEAN, IMAGENET_STD

    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    side, p = args.grid * args.patch, args.patch
    raw = np.stack([make_sample(rng, args.image_size, args.image_size)[0] for _ in range(args.images)])  # (M, H, W, 3) uint8
    x = torch.from_numpy(raw).permute(0, 3, 1, 2).float() / 255.0
    x = F.interpolate(x, size=(side, side), mode="bicubic", align_corners=False).clamp(0, 1)  # as REPA resizes them
    x = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    config = Dinov2Config(hidden_size=args.width, num_hidden_layers=args.depth, num_attention_heads=args.heads,
                          intermediate_size=4 * args.width, patch_size=p, image_size=side)
    encoder = Dinov2Model(config)
    head = torch.nn.Linear(args.width, p * p * 3)
    params = [*encoder.parameters(), *head.parameters()]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.05)
    tokens = args.grid * args.grid
    yardstick = x[:256], torch.rand(min(256, len(x)), tokens, generator=torch.Generator().manual_seed(0)).argsort(dim=1) < int(
        args.mask * tokens)  # images the steps draw from too, but one fixed mask: a steady yardstick

    def masked_l1(batch, masked):
        hidden = encoder(pixel_values=batch, bool_masked_pos=masked).last_hidden_state[:, 1:]
        target = batch.unfold(2, p, p).unfold(3, p, p).permute(0, 2, 3, 1, 4, 5).reshape(len(batch), tokens, -1)
        return (head(hidden) - target).abs().mean(dim=-1)[masked].mean()  # L1 on the masked patches (SimMIM)

    with torch.no_grad():
        before = masked_l1(*yardstick).item()
    start, log_every = time.time(), max(1, args.steps // 20)
    for step in range(args.steps):
        lr = args.lr * min(1.0, (step + 1) / 200) * 0.5 * (1 + np.cos(np.pi * step / args.steps))
        for g in opt.param_groups:
            g["lr"] = lr
        batch = x[torch.randint(0, len(x), (args.batch,))]
        masked = torch.rand(args.batch, tokens).argsort(dim=1) < int(args.mask * tokens)  # exactly that many per image
        loss = masked_l1(batch, masked)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % log_every == 0 or step == 0:
            print(f"step {step + 1}/{args.steps}  masked-patch L1 {loss.item():.4f}  lr {lr:.2e}  {time.time() - start:.0f} s", flush=True)
    with torch.no_grad():
        after = masked_l1(*yardstick).item()
    print(f"masked-patch L1 on one fixed batch and mask: {before:.4f} before training, {after:.4f} after")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    encoder.save_pretrained(args.out)
    print(f"saved the encoder in {args.out}: use it with train.repa.encoder={args.out}")
    return {"fixed_before": before, "fixed_after": after, "loss": loss.item(), "out": args.out}


if __name__ == "__main__":
    main()
