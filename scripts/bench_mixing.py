"""Class mixing in the loader's batches: distinct classes per batch against a uniform draw.

    python scripts/bench_mixing.py                    # ImageNet's layout at 1/4 of its counts + the 200 x 50 layout, ~4 min on 2 cores
    python scripts/bench_mixing.py --scale 1          # ImageNet's own counts: 1.3M samples, 2 x 2.7 GB of shards, ~9 min
    python scripts/bench_mixing.py --out bench/mixing.json

Shards made from class folders in sorted order hold one or two classes each, and a reader that
reads one shard at a time through a shuffle buffer then gives batches of a few classes. This
writes tiny synthetic shards (a (1, 1, 1) fp16 latent and a label per sample, with
data.shards.ShardWriter) from a class-sorted input list, cut into shards by data/prepare.py's
own plan_units: in the sorted order (--shuffle-seed -1, how prepare cut them before) and in its
seeded permutation (the default, --shuffle-seed 0). Each is read by one ShardStream reader
(seed 0) one shard at a time (interleave=1, the old reader) and with its default interleave.

Layouts:
  imagenet  1000 classes x 1300 samples, 1000 per shard (1.3 shards per class), batch 256,
            shuffle buffer 1000. --scale multiplies the samples per class, per shard and the
            buffer alike (default 0.25: 325, 250 and 250, ~1.3 shards per class as in ImageNet);
            the batch stays 256.
  small     200 classes x 50 samples, 500 per shard, batch 64, buffer 1000 (the layout of a
            small real dataset that showed the problem).
Per arm: the distinct classes in each of --batches batches, median and mean, against a uniform
draw: K(1 - (1 - 1/K)^B) exactly (B draws with replacement from K equal classes) and simulated
(B of the layout's samples without replacement). Prints a table, writes JSON (default
docs/bench_mixing.json).
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts.results import write_json  # noqa: E402
from models.cli import HelpFormatter  # noqa: E402

TARGET = 0.10  # the permuted shards' batches within 10% of a uniform draw's distinct classes (imagenet layout)


@dataclass
class Layout:
    name: str
    classes: int
    per_class: int
    per_shard: int
    batch: int
    buffer: int
    note: str = ""

    @property
    def samples(self) -> int:
        return self.classes * self.per_class


def layouts(scale: float) -> list[Layout]:
    note = "ImageNet's counts" if scale == 1 else (f"ImageNet's 1300 per class, 1000 per shard and a 1000-sample buffer, "
                                                   f"all scaled by {scale:g}; the batch is not scaled")
    return [Layout("imagenet", 1000, round(1300 * scale), round(1000 * scale), 256, round(1000 * scale), note),
            Layout("small", 200, 50, 500, 64, 1000, "a small real dataset's layout: 200 classes x 50, 500 per shard")]


def class_sorted_keys(layout: Layout) -> list[str]:
    """The inputs as prepare lists class folders: sorted by path, so class by class."""
    return [f"c{c:04d}_{i:05d}" for c in range(layout.classes) for i in range(layout.per_class)]


def build(folder: Path, layout: Layout, shuffle_seed: int) -> tuple[Path, float]:
    """Shards of ``layout`` cut by prepare's plan (``shuffle_seed`` -1: sorted order). Returns (folder, seconds)."""
    import numpy as np

    from data.prepare import plan_units
    from data.shards import ShardWriter

    t = time.perf_counter()
    folder.mkdir(parents=True)
    keys = class_sorted_keys(layout)
    units = plan_units(folder, dict.fromkeys(keys, 0), {"bench": "mixing"}, layout.per_shard, shuffle_seed)
    assert all(len(u) == layout.per_shard for u in units[:-1])  # the writer's shards are the plan's units
    z = np.zeros((1, 1, 1), np.float16)
    with ShardWriter(folder, layout.per_shard, manifest_fields={"autoencoder": "none", "num_classes": layout.classes}) as w:
        for unit in units:
            for k in unit:
                w.write(k, z, {"label": int(k[1:5])})
    return folder, time.perf_counter() - t


def distinct_per_batch(folder: Path, layout: Layout, interleave: int, batches: int) -> list[int]:
    from data.shards import ShardStream

    stream = ShardStream(folder, layout.batch, seed=0, shuffle_buffer=layout.buffer, interleave=interleave)
    return [len(set(b["label"].tolist())) for _, b in zip(range(batches), stream)]


def uniform(layout: Layout, batches: int) -> tuple[float, list[int]]:
    """(the exact expectation with replacement, a simulated draw of ``batches`` batches without replacement)."""
    import numpy as np

    k, b = layout.classes, layout.batch
    labels = np.repeat(np.arange(k), layout.per_class)
    rng = np.random.default_rng(0)
    sim = [len(np.unique(labels[rng.choice(len(labels), b, replace=False)])) for _ in range(batches)]
    return k * (1 - (1 - 1 / k) ** b), sim


def main(argv=None) -> dict:
    from data.shards import INTERLEAVE

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--scale", type=float, default=0.25, help="the imagenet layout's samples per class, per shard and buffer, "
                                                              "as a share of ImageNet's (1: 1.3M samples)")
    ap.add_argument("--batches", type=int, default=50, help="batches read per arm")
    ap.add_argument("--interleave", type=int, default=INTERLEAVE, help="the new reader's arm (ShardStream's default)")
    ap.add_argument("--jobs", type=int, default=2, help="processes writing shards at once")
    ap.add_argument("--workdir", default=tempfile.gettempdir(), help="where the shards are written (deleted afterwards)")
    ap.add_argument("--out", default="docs/bench_mixing.json")
    args = ap.parse_args(argv)
    if not 0 < args.scale <= 1:
        ap.error("--scale: a share of ImageNet's counts, in (0, 1]")
    arms = [("sorted", -1), ("permuted", 0)]
    rows, built = [], {}
    with tempfile.TemporaryDirectory(prefix="flowdit_bench_mixing_", dir=args.workdir) as tmp:
        with ProcessPoolExecutor(max_workers=args.jobs) as pool:
            futures = {(lay.name, order): pool.submit(build, Path(tmp) / f"{lay.name}_{order}", lay, seed)
                       for lay in layouts(args.scale) for order, seed in arms}
            for key, f in futures.items():
                built[key] = f.result()
                print(f"wrote {key[0]} / {key[1]}: {built[key][1]:.0f} s", flush=True)
        print("\n| layout | inputs cut into shards | interleave | distinct classes per batch: median | mean | uniform: exact "
              "| uniform: simulated median | mean / exact |\n|---|---|---|---|---|---|---|---|")
        for lay in layouts(args.scale):
            exact, sim = uniform(lay, args.batches)
            for order, _ in arms:
                for k in (1, args.interleave):
                    d = distinct_per_batch(built[(lay.name, order)][0], lay, k, args.batches)
                    row = {"layout": lay.name, "order": order, "interleave": k, "median": statistics.median(d),
                           "mean": round(statistics.fmean(d), 1), "uniform_exact": round(exact, 1),
                           "uniform_simulated_median": statistics.median(sim),
                           "uniform_simulated_mean": round(statistics.fmean(sim), 1),
                           "ratio": round(statistics.fmean(d) / exact, 3)}
                    rows.append(row)
                    print(f"| {lay.name} | {'class-sorted' if order == 'sorted' else 'permuted (prepare default)'} | {k} | "
                          f"{row['median']:g} | {row['mean']:.1f} | {exact:.1f} | {row['uniform_simulated_median']:g} | "
                          f"{row['ratio']:.2f} |", flush=True)
    print()
    for lay in layouts(args.scale):
        print(f"{lay.name}: {lay.classes} classes x {lay.per_class} samples ({lay.samples:,}), {lay.per_shard} per shard, "
              f"batch {lay.batch}, shuffle buffer {lay.buffer}; {lay.note}")
    best = next(r for r in rows if r["layout"] == "imagenet" and r["order"] == "permuted" and r["interleave"] == args.interleave)
    met = abs(1 - best["ratio"]) <= TARGET
    print(f"target (imagenet layout, permuted shards, interleave {args.interleave}: within {TARGET:.0%} of uniform): "
          f"{'met' if met else 'NOT met'}, mean / exact = {best['ratio']:.3f}")
    record = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "scale": args.scale, "batches": args.batches,
              "default_interleave": INTERLEAVE, "layouts": [{**asdict(lay), "samples": lay.samples} for lay in layouts(args.scale)],
              "write_seconds": {f"{a}/{b}": round(v[1], 1) for (a, b), v in built.items()}, "rows": rows,
              "target": {"within": TARGET, "ratio": best["ratio"], "met": met}}
    return write_json(record, args.out)


if __name__ == "__main__":
    main()
