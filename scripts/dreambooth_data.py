"""Make a DreamBooth training folder: your instance images under an instance prompt, plus (for prior
preservation) class images that the base model generates first, each with its prompt beside it.

    python scripts/dreambooth_data.py --instance-dir photos/my_dog --instance-prompt "a photo of sks dog" \\
        --base runs/pixart512_init --class-prompt "a photo of a dog" --num-class-images 100 --out datasets/db_dog
    python -m data.prepare --input datasets/db_dog --out datasets/db_dog_shards --size 512 \\
        --autoencoder stabilityai/sd-vae-ft-ema --text-encoder google/t5-v1_1-xxl
    python train_stage2.py data=shards data.path=datasets/db_dog_shards stage.init_from=runs/pixart512_init \\
        train.lora.rank=8 run_dir=runs/db_dog

The instance prompt carries a rare identifier (``sks``) that the fine-tune binds to your subject.
Prior preservation keeps the base's idea of the class: its own samples of the class prompt(s) are
trained on beside yours, so the model does not turn every dog into your dog. The training loss is
the same MSE on both; the ratio of class to instance images sets the prior's weight (DreamBooth
uses about 1:1 per batch with weight 1). Each image is written as ``NAME.png`` with ``NAME.txt``
(its caption) beside it: the layout ``data.prepare`` reads. An image's own ``.txt`` beside it in
--instance-dir wins over --instance-prompt. Without --num-class-images there is no prior set.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # in place: the checkout's packages, not an install's
from models.cli import HelpFormatter, add_device_arguments  # noqa: E402

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--instance-dir", required=True, help="your subject's images (a handful: 3-32)")
    ap.add_argument("--instance-prompt", default=None, help="their caption, with a rare identifier: 'a photo of sks dog'")
    ap.add_argument("--out", required=True, help="the folder to write (images + .txt captions)")
    ap.add_argument("--base", default=None, help="the checkpoint to generate class images with (the one you fine-tune)")
    ap.add_argument("--class-prompt", action="append", default=[],
                    help="the class without the identifier ('a photo of a dog'); repeat for several, used in turn")
    ap.add_argument("--num-class-images", type=int, default=0, help="class images to generate (0: no prior preservation)")
    ap.add_argument("--steps", type=int, default=None, help="sampling steps (default: the base's)")
    ap.add_argument("--cfg", type=float, default=None, help="guidance scale (default: the base's)")
    ap.add_argument("--seed", type=int, default=0, help="noise seed of the class images")
    ap.add_argument("--batch", type=int, default=16, help="class images per sampling call")
    add_device_arguments(ap)
    return ap.parse_args(argv)


def instance_images(folder: Path, prompt: str | None) -> list[tuple[Path, str]]:
    found = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not found:
        raise SystemExit(f"--instance-dir {folder}: no images ({', '.join(IMAGE_SUFFIXES)})")
    out = []
    for path in found:
        side = path.with_suffix(".txt")
        caption = side.read_text().strip() if side.is_file() else prompt
        if not caption:
            raise SystemExit(f"{path} has no caption: give --instance-prompt, or a {side.name} beside it")
        out.append((path, caption))
    return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    from PIL import Image

    out = Path(args.out)
    instances = instance_images(Path(args.instance_dir), args.instance_prompt)
    if args.num_class_images and (not args.base or not args.class_prompt):
        raise SystemExit("prior preservation (--num-class-images) needs --base (the checkpoint to generate with) and --class-prompt")
    out.mkdir(parents=True, exist_ok=True)
    for i, (path, caption) in enumerate(instances):
        Image.open(path).convert("RGB").save(out / f"instance_{i:04d}.png")
        (out / f"instance_{i:04d}.txt").write_text(caption + "\n")
    record = {"instances": len(instances), "instance_prompts": sorted({c for _, c in instances}), "class_images": 0}
    if args.num_class_images:
        from PIL import Image as PILImage

        from inference.images import to_uint8
        from inference.pipeline import Pipeline
        from models.checkpoint import CheckpointError

        try:
            pipe = Pipeline.load(args.base, device=args.device, dtype=args.dtype)
        except CheckpointError as e:
            raise SystemExit(str(e)) from e
        prompts = [args.class_prompt[i % len(args.class_prompt)] for i in range(args.num_class_images)]
        settings = pipe.defaults(steps=args.steps, cfg_scale=args.cfg, seed=args.seed)
        images = to_uint8(pipe(pipe.conditioning.parse(prompts), settings, batch_size=args.batch))
        for i, (img, prompt) in enumerate(zip(images, prompts)):
            PILImage.fromarray(img).save(out / f"class_{i:04d}.png")
            (out / f"class_{i:04d}.txt").write_text(prompt + "\n")
        record.update(class_images=len(prompts), class_prompts=args.class_prompt, base=str(args.base), sampling=settings.to_dict())
    (out / "dreambooth.json").write_text(json.dumps(record, indent=2))
    print(f"wrote {out}: {record['instances']} instance images" + (f", {record['class_images']} class images from {args.base}"
                                                                  if record["class_images"] else " (no prior preservation)"))
    print(f"next: python -m data.prepare --input {out} --out {out}_shards --size SIZE --text-encoder ENCODER (the base's)")
    return record


if __name__ == "__main__":
    main()
