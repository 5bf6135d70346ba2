"""Loader throughput: samples/s that ShardStream delivers, alone (no model), on this machine.

    python scripts/bench_loader.py                       # demo text shards + synthetic 256-px latent shards
    python scripts/bench_loader.py --out bench/loader.json

Cases: the stage-2 demo shards (3x16x16 pixels + the caption embedding the demo trains on,
width 384; the trainer decodes only the captions its caption_mix uses),
and synthetic shards at a real run's 256-px SD3 latent size (16x32x32 fp16), without text
and with a T5-XXL-width caption embedding (32 tokens x 4096, fp16). Each case reads
--batches batches of --batch samples after one warm-up batch, with 0 and 2 DataLoader
workers. The table compares the demo case to what the demo's training step consumes
(--train-img-s, measured: 2.2 steps/s x 64 = ~140 samples/s for the stage-2 demo on 2 cores).
"""
from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scripts.results import write_json  # noqa: E402
from models.cli import HelpFormatter  # noqa: E402


def synthetic(out: Path, n: int, latent_shape, text: tuple[int, int] | None) -> Path:
    import numpy as np

    from data.shards import ShardWriter
    from data.shards import write_null

    if (out / "manifest.json").is_file():
        return out
    rng = np.random.default_rng(0)
    fields = {"autoencoder": "synthetic", "text_encoder": {"name": "synthetic", "max_length": 120, "width": text[1],
                                                           "captions": ["long"]} if text else None}
    out.mkdir(parents=True, exist_ok=True)
    if text:
        write_null(out, np.zeros((2, text[1]), np.float16))
    with ShardWriter(out, 1000, manifest_fields=fields) as w:
        for i in range(n):
            arrays = {"text_long": rng.standard_normal(text).astype(np.float16)} if text else None
            w.write(f"{i:08d}", rng.standard_normal(latent_shape).astype(np.float16),
                    {"caption": f"sample {i}", "captions": {"long": f"sample {i}"}}, arrays)
    return out


def measure(path: Path, batch: int, batches: int, workers: int, text_names=None) -> float:
    import torch

    from data.shards import ShardStream

    stream = ShardStream(path, batch, shuffle_buffer=1000, text_names=text_names)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers)
    it = iter(loader)
    next(it)  # warm-up: worker start, first shard open
    t = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * batch / (time.perf_counter() - t)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--demo", default="data/demo/shapes_text_16", help="the stage-2 demo shards (built by the demo)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--batches", type=int, default=60)
    ap.add_argument("--train-img-s", type=float, default=140.0, help="what the demo's stage-2 training step consumes (samples/s)")
    ap.add_argument("--out", default="bench/loader.json")
    args = ap.parse_args(argv)
    root = Path(tempfile.gettempdir()) / "flowdit_bench_loader"
    cases = {"demo stage 2 (3x16x16 px + the long caption's 10 x 384 text)": Path(args.demo),
             "256-px latents (16x32x32 fp16)": synthetic(root / "latent", 5000, (16, 32, 32), None),
             "256-px latents + T5-XXL text (32 x 4096 fp16)": synthetic(root / "latent_t5", 5000, (16, 32, 32), (32, 4096))}
    rows = []
    print("| case | workers | samples/s | x demo training consumption |\n|---|---|---|---|")
    for name, path in cases.items():
        if not (path / "manifest.json").is_file():
            print(f"| {name} | - | missing: build it with `python train_stage2.py experiment=demo_stage2` first | |")
            continue
        for workers in (0, 2):
            rate = measure(path, args.batch, args.batches, workers, ["long"] if "demo" in name else None)
            rows.append({"case": name, "workers": workers, "samples_per_s": round(rate, 1), "x_train": round(rate / args.train_img_s, 1)})
            print(f"| {name} | {workers} | {rate:.0f} | {rate / args.train_img_s:.1f}x |", flush=True)
    record = {"machine": f"{platform.machine()}, {__import__('os').cpu_count()} cores", "batch": args.batch, "batches": args.batches,
              "train_img_s": args.train_img_s, "rows": rows}
    return write_json(record, args.out)


if __name__ == "__main__":
    main()
