"""What REPA's target costs beside the step it rides on, in FLOPs per image (torch's FlopCounterMode on
models built here with random weights: the counts depend on the shapes only):

    python scripts/bench_repa_sources.py            # 256 px: SD3 VAE decode, DINOv2-B, a PixArt-XL/2 training step

The decode is what a REPA run pays on latent shards without stored pixels (data.prepare --keep-images).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # in place: the checkout's packages, not an install's
from models.cli import HelpFormatter  # noqa: E402


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--size", type=int, default=256, help="image side in pixels")
    ap.add_argument("--json", default="bench/bench_repa_sources.json")
    return ap.parse_args(argv)


def count(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as c:
        fn()
    return c.get_total_flops() / 1e9


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch
    from diffusers import AutoencoderKL
    from transformers import Dinov2Config, Dinov2Model

    from models.presets import build_model, model_config
    from scripts.results import write_json
    from training.step import Local, MicroBatch, train_step

    latent = args.size // 8
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                        latent_channels=16, norm_num_groups=32, use_quant_conv=False, use_post_quant_conv=False).eval()  # SD3's shape
    with torch.no_grad():
        decode = count(lambda: vae.decode(torch.randn(1, 16, latent, latent)))
    dino = Dinov2Model(Dinov2Config()).eval()  # DINOv2-B/14
    grid = latent // 2  # a patch-2 model's token grid: the encoder sees grid x 14 pixels
    with torch.no_grad():
        encoder = count(lambda: dino(pixel_values=torch.randn(1, 3, grid * 14, grid * 14)))
    model = build_model("mmdit", model_config("mmdit", "PixArt-alpha-XL/2", input_size=latent, in_channels=4, caption_channels=4096))

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x0 = torch.randn(1, 4, latent, latent)
    batch = MicroBatch(x0, {"encoder_hidden_states": torch.randn(1, 120, 4096),
                            "encoder_attention_mask": torch.ones(1, 120, dtype=torch.bool)}, torch.rand(1), torch.randn_like(x0))
    train = count(lambda: train_step(Local(model), optimizer, [batch], 1, grad_clip=1.0))  # the trainer's own step
    rows = {"sd3_vae_decode": decode, "dinov2_base_forward": encoder, "pixart_xl2_train_step": train}
    print(f"\n{args.size} px, GFLOPs per image (FlopCounterMode):\n\n| what | GFLOPs | x the PixArt-XL/2 step |\n|---|---|---|")
    for k, v in rows.items():
        print(f"| {k} | {v:.0f} | {v / train:.2f} |")
    result = {"size": args.size, "gflops_per_image": rows, "command": " ".join(["python scripts/bench_repa_sources.py", *sys.argv[1:]])}
    write_json(result, args.json)
    return result


if __name__ == "__main__":
    main()
