"""Prepare training data: images (+ captions, labels) -> VAE latents (+ text embeddings) in tar shards.

    python -m data.prepare --input photos/ --out data/photos_sd3 --autoencoder stabilityai/stable-diffusion-3-medium-diffusers \\
        --autoencoder-subfolder vae --size 256
    python -m data.prepare --input captions.jsonl --out data/mix --buckets 65536 --bucket-step 64 --text-encoder google/t5-v1_1-xxl
    python -m data.prepare --input "shards/{000000..000099}.tar" --out data/big --rank 3 --world-size 16   # one of 16 workers
    sbatch --array=0-15 scripts/slurm/prepare.sbatch --input ... --out ...                             # SLURM array

Inputs (--input):
  a folder       images anywhere below it; ``x.jpg`` + ``x.txt`` gives a caption; images in class
                 sub-folders (``root/cat/1.jpg``) get the folder's index as their label
  .csv / .jsonl  rows of path, caption[, short_caption][, label][, score]; paths relative to the file
  .tar shards    WebDataset tars (local paths or http(s) URLs, ``{000..099}`` brace ranges): members
                 ``key.jpg`` + ``key.txt`` (or ``key.json`` with "caption") [+ ``key.cls``]

Images: EXIF orientation applied, any mode to RGB (alpha composited on white), images
smaller than --min-size skipped (by default half the output's shorter side), then resized
(shorter side) and center-cropped to --size, or to the nearest aspect-ratio bucket of about
--buckets pixels (sides multiples of --bucket-step). Original size, crop box and bucket go
into each sample's metadata.

Images larger than --max-pixels are skipped from their header, before they are decoded;
16-bit and 32-bit images are scaled to 8 bits, not clipped.

Work is cut into units of --samples-per-shard inputs, taken from the sorted inputs in a
permutation seeded by --shuffle-seed, so that shards made from class folders hold every
class rather than one or two (--shuffle-seed -1 keeps the sorted order). Unit u becomes
shard ``shard-{u:06d}.tar`` and belongs to worker ``u % world_size``. A shard is written to
a temporary name and renamed when complete, with a small summary beside it, so a rerun
skips finished units and redoes interrupted ones; any number of workers produce the same
shards. The last worker to finish writes ``manifest.json``.

Skipped inputs are listed with their reasons in each unit's summary, and the run ends with
the samples kept and the inputs skipped by reason. When the folder is complete, a folder
that holds no sample, or one that skipped more than --max-skipped of its inputs, ends the
run with exit status 1 and what to change (the kept samples and the manifest are written
first; a folder with no sample gets no manifest). The check covers the whole folder, units
of earlier runs included, so rerunning a failed preparation fails again until its settings
change (with --force) or --max-skipped allows it.

Reruns into the same --out add up: ``prepare.json`` records the settings and which inputs
went into which unit. The same settings resume; new inputs become new units (nothing
redone, lost or duplicated; --shuffle-seed permutes them too); other settings, or inputs of
the earlier run that are gone, are refused with the reason (--force starts the folder afresh).
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import math
import os
import re
import shlex
import sys
import tarfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from data.control import CONTROL_KINDS
from models.atomic import AtomicFile, atomic_write_text
from models.cli import HelpFormatter

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
UNIT_FORMAT = "shard-{:06d}"
PLAN = "prepare.json"
PLAN_FORMAT = "flowdit-prepare-v1"
MAX_PIXELS = 40_000_000  # an 8000 x 5000 photo; decoding needs ~4 bytes a pixel and more to resize


class Skip(Exception):
    """This input cannot become a sample; the message is the reason."""


@dataclass
class Item:
    source: str  # what the user would recognise: a relative path or tar:member
    read: Callable[[], bytes]
    size: int = -1  # bytes, the input's fingerprint for reruns (-1: unknown, e.g. a missing file)
    captions: dict[str, str] = field(default_factory=dict)
    label: int | None = None
    extra: dict = field(default_factory=dict)  # scores, caption decoding notes

    @property
    def key(self) -> str:
        """A WebDataset-safe key (no dots or slashes), stable and unique per source."""
        stem = re.sub(r"[^A-Za-z0-9_-]+", "_", os.path.splitext(self.source)[0])[-60:].strip("_")
        return f"{stem}_{hashlib.sha1(self.source.encode()).hexdigest()[:10]}"


# ---------------------------------------------------------------- inputs
def decode_caption(raw: bytes) -> tuple[str, str | None]:
    """Caption bytes -> (text, note). UTF-8 if it is, else cp1252/latin-1 with a note, never an error."""
    try:
        return raw.decode("utf-8-sig").strip(), None
    except UnicodeDecodeError:
        for enc in ("cp1252", "latin-1"):
            try:
                return raw.decode(enc).strip(), f"caption not UTF-8, decoded as {enc}"
            except UnicodeDecodeError:
                continue
    return raw.decode("utf-8", errors="replace").strip(), "caption not UTF-8, undecodable bytes replaced"


def _file_reader(path: Path) -> Callable[[], bytes]:
    return lambda: path.read_bytes()


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return -1


def list_folder(root: Path) -> tuple[list[Item], list[str]]:
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTS)
    class_dirs = sorted({p.relative_to(root).parts[0] for p in files if len(p.relative_to(root).parts) > 1})
    items = []
    for p in files:
        rel = p.relative_to(root).as_posix()
        item = Item(rel, _file_reader(p), _size(p))
        side = p.with_suffix(".txt")
        if side.is_file():
            text, note = decode_caption(side.read_bytes())
            item.captions["long"] = text
            if note:
                item.extra["caption_note"] = note
        if class_dirs and len(p.relative_to(root).parts) > 1:
            item.label = class_dirs.index(p.relative_to(root).parts[0])
        items.append(item)
    return items, class_dirs


def list_table(path: Path) -> tuple[list[Item], list[str]]:
    rows = []
    if path.suffix.lower() == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    else:
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    items = []
    for i, row in enumerate(rows):
        if "path" not in row:
            raise SystemExit(f"{path}: row {i + 1} has no 'path' column/key (expected path, caption[, short_caption, label, score])")
        p = Path(row["path"]) if Path(row["path"]).is_absolute() else path.parent / row["path"]
        item = Item(str(row["path"]), _file_reader(p), _size(p))
        if row.get("caption"):
            item.captions["long"] = str(row["caption"]).strip()
        if row.get("short_caption"):
            item.captions["short"] = str(row["short_caption"]).strip()
        if row.get("label") not in (None, ""):
            item.label = int(row["label"])
        for k in ("score", "aesthetic_score"):
            if row.get(k) not in (None, ""):
                item.extra.setdefault("scores", {})[k] = float(row[k])
        items.append(item)
    return sorted(items, key=lambda it: it.source), []


def expand_braces(spec: str) -> list[str]:
    """``a{000..002}b`` -> [a000b, a001b, a002b] (zero padding kept); several ranges multiply."""
    m = re.search(r"\{(\d+)\.\.(\d+)\}", spec)
    if not m:
        return [spec]
    lo, hi, width = int(m.group(1)), int(m.group(2)), len(m.group(1))
    return [x for i in range(lo, hi + 1) for x in expand_braces(spec[: m.start()] + str(i).zfill(width) + spec[m.end():])]


def _open_tar(url: str) -> tarfile.TarFile:
    if url.startswith(("http://", "https://")):
        import urllib.request

        return tarfile.open(fileobj=urllib.request.urlopen(url), mode="r|*")  # streamed
    return tarfile.open(url, "r")


def list_tars(spec: str) -> tuple[list[Item], list[str]]:
    """Index WebDataset tars: every image of the given tars is read into memory here (fine for the
    shard or few shards one worker handles; split big inputs across workers)."""
    items = []
    for url in expand_braces(spec):
        groups: dict[str, dict[str, bytes]] = {}
        with _open_tar(url) as tar:
            for member in tar:
                if not member.isfile():
                    continue
                base = os.path.basename(member.name)
                key, _, ext = base.partition(".")
                key = os.path.join(os.path.dirname(member.name), key)
                ext = ext.lower()
                if "." + ext in IMAGE_EXTS or ext in ("txt", "json", "cls"):
                    groups.setdefault(key, {})[ext] = tar.extractfile(member).read()
        for key in sorted(groups):
            g = groups[key]
            image_ext = next((e for e in g if "." + e in IMAGE_EXTS), None)
            if image_ext is None:
                continue
            payload = g[image_ext]
            item = Item(f"{os.path.basename(url)}:{key}.{image_ext}", (lambda b=payload: b), len(payload))
            if "txt" in g:
                text, note = decode_caption(g["txt"])
                item.captions["long"] = text
                if note:
                    item.extra["caption_note"] = note
            elif "json" in g:
                meta = json.loads(g["json"])
                for name, k in (("long", "caption"), ("short", "short_caption")):
                    if meta.get(k):
                        item.captions[name] = str(meta[k])
            if "cls" in g:
                item.label = int(g["cls"].decode().strip())
            items.append(item)
    return items, []


def list_inputs(spec: str) -> tuple[list[Item], list[str]]:
    p = Path(spec)
    if p.is_dir():
        return list_folder(p)
    if p.suffix.lower() in (".csv", ".jsonl", ".json") and p.is_file():
        return list_table(p)
    if ".tar" in spec:
        return list_tars(spec)
    raise SystemExit(f"--input {spec!r}: expected an image folder, a .csv/.jsonl file, or .tar shard(s) (with {{000..099}} ranges)")


# ---------------------------------------------------------------- images
def load_rgb(data: bytes, max_pixels: int = MAX_PIXELS):
    """Bytes -> RGB PIL image: EXIF orientation applied, alpha composited on white, high bit depths
    scaled to 8 bits, any mode converted. Images over ``max_pixels`` are refused from the header."""
    from PIL import Image, ImageOps

    try:
        img = Image.open(io.BytesIO(data))  # reads the header only
    except Exception as e:
        raise Skip(f"unreadable image ({type(e).__name__}: {e})") from None
    w, h = img.size
    if w * h > max_pixels:
        raise Skip(f"too large ({w}x{h} = {w * h / 1e6:.0f}M pixels, --max-pixels {max_pixels / 1e6:g}M)")
    try:
        img.load()
    except Exception as e:
        raise Skip(f"unreadable image ({type(e).__name__}: {e})") from None
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):  # 16 / 32-bit grey: scale, don't clip at 255
        a = np.asarray(img, dtype=np.float64)
        top = 1.0 if img.mode == "F" and a.max() <= 1.0 else (65535.0 if a.max() > 255 or img.mode.startswith("I;16") else 255.0)
        img = Image.fromarray(np.clip(np.round(a / top * 255.0), 0, 255).astype(np.uint8), "L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    return img.convert("RGB")


def resize_crop(img, height: int, width: int):
    """Scale to cover (height, width), center-crop. Returns (image, crop box in original pixels)."""
    from PIL import Image

    w0, h0 = img.size
    scale = max(width / w0, height / h0)
    rw, rh = max(width, round(w0 * scale)), max(height, round(h0 * scale))
    resized = img.resize((rw, rh), Image.BICUBIC, reducing_gap=3.0)
    left, top = (rw - width) // 2, (rh - height) // 2
    box = [left / scale, top / scale, (left + width) / scale, (top + height) / scale]
    return resized.crop((left, top, left + width, top + height)), [round(v, 2) for v in box]


def to_tensor(img) -> "np.ndarray":
    return np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1.0  # (3, H, W) in [-1, 1]


# ---------------------------------------------------------------- captioners
class ExistingCaptions:
    """The default captioner: the captions the inputs came with."""

    name = "existing"

    def __call__(self, images, items) -> list[dict[str, str]]:
        return [dict(it.captions) for it in items]


def make_captioner(name: str, args) -> Callable:
    if name == "existing":
        return ExistingCaptions()
    if name == "vllm":  # GPU only; imported only when chosen
        from data.captioners.vllm_captioner import VLLMCaptioner

        return VLLMCaptioner(args.vlm_model, args.long_prompt, args.short_prompt)
    raise SystemExit(f"--captioner {name!r}: expected 'existing' or 'vllm'")


# ---------------------------------------------------------------- the work
def worker_position(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """--rank/--world-size, else SLURM array variables, else (0, 1)."""
    env = os.environ
    if rank is None and "SLURM_ARRAY_TASK_ID" in env:
        rank = int(env["SLURM_ARRAY_TASK_ID"]) - int(env.get("SLURM_ARRAY_TASK_MIN", 0))
        world_size = world_size or int(env.get("SLURM_ARRAY_TASK_COUNT", 1))
    rank, world_size = rank or 0, world_size or 1
    if not 0 <= rank < world_size:
        raise SystemExit(f"--rank {rank} is outside 0..{world_size - 1}")
    return rank, world_size


class Preparer:
    def __init__(self, args):
        import torch

        from models.autoencoder import load_autoencoder

        self.args = args
        self.device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
        self.ae = load_autoencoder(args.autoencoder, args.autoencoder_subfolder).to(self.device)
        self.text = None
        if args.text_encoder:
            from models.text_encoder import CachedEncoder, TextEncoder

            self.text = CachedEncoder(TextEncoder(args.text_encoder, max_length=args.max_length).to(self.device))
        self.captioner = make_captioner(args.captioner, args)
        self.buckets = None
        if args.buckets:
            from data.buckets import make_buckets

            self.buckets = make_buckets(args.buckets, args.bucket_step)
        unit = self.ae.downsample
        sides = [args.size] if not self.buckets else [s for hw in self.buckets for s in hw]
        bad = [s for s in sides if s % unit]
        if bad:
            raise SystemExit(f"image sides {sorted(set(bad))[:4]} are not multiples of the autoencoder's downsampling ({unit})")

    def target(self, img) -> tuple[int, int]:
        if self.buckets:
            from data.buckets import nearest_bucket

            return nearest_bucket(img.size[1], img.size[0], self.buckets)
        return self.args.size, self.args.size

    def encode(self, pixels: list[np.ndarray]) -> list[np.ndarray]:
        import torch

        with torch.no_grad():
            x = torch.from_numpy(np.stack(pixels)).to(self.device)
            return [z.astype(np.float16) for z in self.ae.encode(x).float().cpu().numpy()]

    def run_unit(self, u: int, items: list[Item], out: Path) -> dict:
        """Turn one unit of inputs into one shard, atomically. Returns the unit's summary."""
        from data.control import control_map, to_pixels
        from data.shards import add_member, npy_bytes

        a = self.args
        name = UNIT_FORMAT.format(u)
        shard = AtomicFile(out / f"{name}.tar", tmp=out / f".{name}.tar.tmp")
        skipped, ready = [], []
        for item in items:
            try:
                img = load_rgb(item.read(), a.max_pixels)
                w0, h0 = img.size
                if min(w0, h0) < a.min_size:
                    raise Skip(f"too small ({w0}x{h0}, --min-size {a.min_size})")
                h, w = self.target(img)
                cropped, box = resize_crop(img, h, w)
                ready.append((item, cropped, {"original_size": [h0, w0], "crop_box": box, "bucket": [h, w]}))
            except Skip as e:
                skipped.append({"source": item.source, "reason": str(e)})
            except OSError as e:
                skipped.append({"source": item.source, "reason": f"cannot read ({e.strerror or e})"})
        captions = self.captioner([r[1] for r in ready], [r[0] for r in ready]) if ready else []
        if self.text is not None:  # text data: a sample needs a caption to be embedded
            keep = [i for i, caps in enumerate(captions) if any(t.strip() for t in caps.values())]
            skipped += [{"source": ready[i][0].source, "reason": "no caption (a text encoder was asked for)"}
                        for i in range(len(ready)) if i not in keep]
            ready, captions = [ready[i] for i in keep], [captions[i] for i in keep]
        embeddings = {}
        if self.text is not None:  # one batched call for the unit's captions (cached across units)
            flat = [(i, n, t) for i, caps in enumerate(captions) for n, t in caps.items()]
            embeddings = {(i, n): e for (i, n, _), e in zip(flat, self.text([t for _, _, t in flat]))}
        samples = []
        by_bucket: dict[tuple, list[int]] = {}
        for i, (_, _, meta) in enumerate(ready):
            by_bucket.setdefault(tuple(meta["bucket"]), []).append(i)
        latents: list = [None] * len(ready)
        controls: dict[str, list] = {k: [None] * len(ready) for k in a.control}
        for idx in by_bucket.values():  # batched per bucket: one shape per batch
            for j in range(0, len(idx), a.batch_size):
                chunk = idx[j : j + a.batch_size]
                for i, z in zip(chunk, self.encode([to_tensor(ready[i][1]) for i in chunk])):
                    latents[i] = z
                for kind in a.control:  # the image's control map, through the same autoencoder
                    maps = [to_pixels(control_map(kind, np.asarray(ready[i][1]))) for i in chunk]
                    for i, z in zip(chunk, self.encode(maps)):
                        controls[kind][i] = z
        with tarfile.open(shard.tmp, "w") as tar:
            for i, ((item, _, meta), caps, z) in enumerate(zip(ready, captions, latents)):
                meta = {**meta, "source": item.source, "captions": caps, "caption": caps.get("long", next(iter(caps.values()), "")),
                        **({"label": item.label} if item.label is not None else {}), **item.extra}
                add_member(tar, f"{item.key}.latent.npy", npy_bytes(z))
                add_member(tar, f"{item.key}.json", json.dumps(meta, sort_keys=True).encode())
                for kind in a.control:
                    add_member(tar, f"{item.key}.control_{kind}.npy", npy_bytes(controls[kind][i]))
                if a.keep_images:  # (3, H, W) uint8: the pixels the latent encodes
                    add_member(tar, f"{item.key}.image.npy", npy_bytes(np.asarray(ready[i][1], dtype=np.uint8).transpose(2, 0, 1)))
                if self.text is not None:
                    for cname in caps:
                        add_member(tar, f"{item.key}.text_{cname}.npy", npy_bytes(embeddings[(i, cname)]))
                samples.append(meta)
        shard.commit()
        buckets = {f"{h}x{w}": len(v) for (h, w), v in sorted(by_bucket.items())}
        summary = {"name": f"{name}.tar", "num_samples": len(samples), "inputs": len(items), "skipped": skipped, "buckets": buckets,
                   "caption_names": sorted({k for s in samples for k in s["captions"]}),
                   "latent_shapes": sorted({tuple(z.shape) for z in latents if z is not None})}
        atomic_write_text(out / f"{name}.json", json.dumps(summary, indent=1))
        return summary


def settings_of(args) -> dict:
    """What decides a unit's contents: a rerun into the same folder must use the same."""
    keys = ["size", "buckets", "bucket_step", "min_size", "max_pixels", "autoencoder", "autoencoder_subfolder", "text_encoder",
            "max_length", "captioner", "samples_per_shard"]
    if args.control:  # absent when none: folders prepared before control maps existed keep resuming
        keys.append("control")
    if getattr(args, "keep_images", False):
        keys.append("keep_images")
    if args.captioner == "vllm":
        keys += ["vlm_model", "long_prompt", "short_prompt"]
    return {k: getattr(args, k) for k in keys}


def arrange(keys: list[str], shuffle_seed: int, salt: int = 0) -> list[str]:
    """The order in which ``keys`` (sorted) are cut into units: a permutation seeded by ``shuffle_seed``
    and ``salt`` (the number of units planned before them), or the sorted order for a negative seed.
    Inputs listed class folder by class folder would otherwise give shards of one or two classes."""
    if shuffle_seed < 0:
        return list(keys)
    return [keys[i] for i in np.random.default_rng([shuffle_seed, salt]).permutation(len(keys))]


def stable_labels(out: Path, items: list[Item], class_names: list[str]) -> list[str]:
    """Class folders' labels as an earlier run into ``out`` numbered them, new folders numbered after
    those: a folder added on a rerun (sorted before the others, say) must not renumber the classes of
    shards already written. Relabels ``items`` in place; returns the class names in label order."""
    path = out / PLAN
    before = json.loads(path.read_text()).get("class_names") if path.is_file() else None
    if not before or not class_names or before == class_names:
        return class_names
    names = list(before) + [n for n in class_names if n not in before]
    index = {n: i for i, n in enumerate(names)}
    for item in items:
        if item.label is not None:
            item.label = index[class_names[item.label]]
    return names


def plan_units(out: Path, sizes: dict[str, int], settings: dict, per_unit: int, shuffle_seed: int = 0,
               class_names: list[str] | None = None) -> list[list[str]]:
    """Which input keys each unit holds: the earlier run's plan (``prepare.json``) with any new inputs
    in new units after it, or a fresh plan. ``sizes``: every input key (in order) and its size in
    bytes, the fingerprint kept in the plan. The inputs a plan adds are cut into units in the order
    ``arrange(keys, shuffle_seed)`` gives; the seed is recorded, but is no setting: units already
    planned stay as they are whatever it is (plans from before it existed resume too).
    SystemExit with the reason when the folder was made with other settings, or inputs of the
    earlier run are gone or changed."""
    keys = list(sizes)
    path = out / PLAN
    if not path.is_file():
        if any(out.glob("shard-*")) or (out / "manifest.json").exists():
            raise SystemExit(f"{out} already holds shards without a {PLAN} (an older preparation): nothing is known of what "
                             "they hold. Use another --out, or --force to start this folder afresh.")
        order = arrange(keys, shuffle_seed)
        units = [order[i: i + per_unit] for i in range(0, len(order), per_unit)]
    else:
        plan = json.loads(path.read_text())
        changed = {k: (plan["settings"].get(k), v) for k, v in settings.items() if plan["settings"].get(k) != v}
        if changed:
            then = " ".join(f"--{k.replace('_', '-')} {shlex.quote(str(a))}" for k, (a, _) in changed.items() if a is not None)
            raise SystemExit(f"{out} was prepared with other settings (then, now): {changed}. Rerun with the same settings to "
                             f"resume or add inputs{f' ({then})' if then else ''}, use another --out, or --force to start "
                             "this folder afresh.")
        units = plan["units"]
        planned = {k for unit in units for k in unit}
        gone = sorted(planned - set(keys))
        if gone:
            raise SystemExit(f"{len(gone)} input(s) of the earlier run into {out} are not among the inputs now "
                             f"(e.g. {gone[:3]}): restore them, use another --out, or --force to start afresh.")
        before = plan.get("sizes", {})
        changed = sorted(k for k in planned if k in before and before[k] != sizes[k])
        if changed:
            raise SystemExit(f"{len(changed)} input(s) changed since the earlier run into {out} (other sizes, e.g. {changed[:3]}): "
                             "their shards would hold the old images. Restore them, use another --out, or --force to start afresh.")
        new = arrange([k for k in keys if k not in planned], shuffle_seed, salt=len(units))
        units = units + [new[i: i + per_unit] for i in range(0, len(new), per_unit)]
        if not new:  # nothing added: the record stays as it was (None: a plan from before the seed, in sorted order)
            shuffle_seed = plan.get("shuffle_seed")
    atomic_write_text(path, json.dumps({"format": PLAN_FORMAT, "settings": settings, "shuffle_seed": shuffle_seed, "units": units,
                                        "sizes": sizes, "class_names": class_names or None}, indent=1))
    return units


def clear(out: Path) -> None:
    """--force: what an earlier preparation wrote into ``out`` (its other files stay)."""
    from data.shards import MANIFEST, NULL_TEXT

    for f in [*out.glob("shard-*"), *out.glob(".shard-*"), out / MANIFEST, out / PLAN, out / NULL_TEXT]:
        f.unlink(missing_ok=True)


def unit_done(out: Path, u: int) -> bool:
    name = UNIT_FORMAT.format(u)
    return (out / f"{name}.tar").is_file() and (out / f"{name}.json").is_file()


def write_manifest(out: Path, units: int, fields: dict) -> dict | None:
    """Once every unit is done (by any worker), the manifest: idempotent, same content whoever writes it.
    None while units are missing. A folder without any sample gets no manifest file (the dict is returned)."""
    from data.shards import FORMAT, MANIFEST

    if not all(unit_done(out, u) for u in range(units)):
        return None
    summaries = [json.loads((out / f"{UNIT_FORMAT.format(u)}.json").read_text()) for u in range(units)]
    shapes = {tuple(shape) for s in summaries for shape in s["latent_shapes"]}
    buckets: dict[str, int] = {}
    for s in summaries:
        for b, n in s["buckets"].items():
            buckets[b] = buckets.get(b, 0) + n
    names = sorted({n for s in summaries for n in s["caption_names"]})
    manifest = {
        "format": FORMAT,
        "latent_shape": list(shapes.pop()) if len(shapes) == 1 else None,
        **fields,
        "buckets": buckets,
        "num_samples": sum(s["num_samples"] for s in summaries),
        "skipped": sum(len(s["skipped"]) for s in summaries),
        "shards": [{"name": s["name"], "num_samples": s["num_samples"]} for s in summaries if s["num_samples"]],
    }
    if manifest.get("text_encoder"):
        manifest["text_encoder"]["captions"] = names
    if manifest["num_samples"]:  # an empty folder must not look like training data
        atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=2))
    return manifest


def reason_of(text: str) -> str:
    """A skip's reason without its details: 'too small (32x32, --min-size 64)' -> 'too small'."""
    return text.split(" (")[0]


def tally(out: Path, units) -> dict:
    """Inputs, samples kept and inputs skipped by reason (most first) over the summaries of the finished
    ``units``; ``too_small``: the sizes ('WxH') of the images skipped as too small, and how many of each."""
    inputs = kept = 0
    reasons: dict[str, int] = {}
    small: dict[str, int] = {}
    for u in units:
        path = out / f"{UNIT_FORMAT.format(u)}.json"
        if not path.is_file():
            continue
        s = json.loads(path.read_text())
        inputs += s["inputs"]
        kept += s["num_samples"]
        for sk in s["skipped"]:
            reason = reason_of(sk["reason"])
            reasons[reason] = reasons.get(reason, 0) + 1
            m = re.match(r"too small \((\d+x\d+)", sk["reason"])
            if m:
                small[m.group(1)] = small.get(m.group(1), 0) + 1
    return {"inputs": inputs, "kept": kept, "skipped": dict(sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0]))),
            "too_small": dict(sorted(small.items(), key=lambda kv: (-kv[1], kv[0])))}


def describe(t: dict) -> str:
    """'kept 5 of 7 inputs, skipped 2 (unreadable image: 1, too small: 1)'."""
    by = ", ".join(f"{r}: {n}" for r, n in t["skipped"].items())
    return f"kept {t['kept']} of {t['inputs']} inputs, skipped {t['inputs'] - t['kept']}" + (f" ({by})" if by else "")


def advice(t: dict, args) -> list[str]:
    """What to change, for each reason inputs were skipped for."""
    out = []
    for reason, n in t["skipped"].items():
        if reason == "too small":
            sizes = list(t["too_small"].items())
            seen = (f" of {sizes[0][0]}" if len(sizes) == 1 else
                    " sized " + ", ".join(f"{k} ({v})" for k, v in sizes[:3]) + (", ..." if len(sizes) > 3 else "") if sizes else "")
            smallest = min((min(int(v) for v in k.split("x")) for k in t["too_small"]), default=None)
            keep = f" (--min-size {smallest} keeps them all)" if smallest else ""
            out.append(f"--min-size {args.min_size} skipped {n} images{seen}: lower --min-size{keep}")
        elif reason == "too large":
            out.append(f"--max-pixels {args.max_pixels} skipped {n} images: raise --max-pixels if this machine has the memory")
        elif reason == "unreadable image":
            out.append(f"{n} files are not images that can be read: see the 'skipped' lines, or the shards' .json summaries")
        elif reason == "cannot read":
            out.append(f"{n} inputs could not be read (missing, or no permission): check the paths --input lists")
        elif reason == "no caption":
            out.append(f"{n} images have no caption, which --text-encoder needs: add captions (x.txt beside x.jpg, or a "
                       "caption column), or leave out --text-encoder")
        else:
            out.append(f"{n} inputs skipped: {reason}")
    return out


def verdict(t: dict, args, out: Path) -> str | None:
    """Why a complete folder is a failed preparation (nothing kept, or more than --max-skipped of its inputs
    skipped), with what to change; None when it is not."""
    skipped = t["inputs"] - t["kept"]
    if not t["inputs"] or (t["kept"] and skipped <= args.max_skipped * t["inputs"]):  # no sample fails even at --max-skipped 1
        return None
    hints = "; ".join(advice(t, args))
    redo = f"then rerun with --force ({out / PLAN} holds this run's settings, so other settings are refused without it)"
    if not t["kept"]:
        return f"{out}: {describe(t)}: no sample, so no manifest.json was written. {hints}; {redo}."
    share = skipped / t["inputs"]
    return (f"{out}: {describe(t)}: {share:.0%} of the inputs, more than --max-skipped {args.max_skipped:g}. {hints}. "
            f"The {t['kept']} samples kept are written, with manifest.json: to keep them as they are, rerun with "
            f"--max-skipped {math.floor(share * 100) / 100 + 0.01:.2f} (nothing is redone); to redo them with other settings, "
            f"change them and {redo.removeprefix('then ')}.")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--input", required=True, help="image folder, .csv/.jsonl table, or .tar shard(s) / URL template")
    ap.add_argument("--out", required=True, help="output folder: shards, per-shard summaries, manifest.json")
    ap.add_argument("--size", type=int, default=256, help="square output side in pixels (ignored with --buckets)")
    ap.add_argument("--buckets", type=int, default=0, help="aspect-ratio buckets of about this many pixels (e.g. 65536; 0: square --size)")
    ap.add_argument("--bucket-step", type=int, default=64, help="bucket sides are multiples of this")
    ap.add_argument("--min-size", type=int, default=None,
                    help="skip images whose shorter side is smaller (default: half the output's shorter side: half of --size, "
                         "or of the smallest bucket's shorter side with --buckets)")
    ap.add_argument("--max-skipped", type=float, default=0.5, metavar="FRACTION",
                    help="a complete folder that skipped more than this share of its inputs ends the run with exit status 1 "
                         "and the counts by reason, after writing what it kept (a folder with no sample always does)")
    ap.add_argument("--max-pixels", type=int, default=MAX_PIXELS, help="skip images with more pixels, read from the header before decoding")
    ap.add_argument("--force", action="store_true", help="start --out afresh: delete what an earlier preparation wrote there")
    ap.add_argument("--autoencoder", default="none", help="diffusers AutoencoderKL id or folder; 'none' keeps pixels")
    ap.add_argument("--autoencoder-subfolder", default=None,
                    help="e.g. 'vae' inside a pipeline repo (default: none, the autoencoder is at the top of --autoencoder)")
    ap.add_argument("--text-encoder", default=None,
                    help="also store caption embeddings (fp16) from this encoder (default: none, no embeddings)")
    ap.add_argument("--max-length", type=int, default=120, help="text encoder token limit (longer captions are truncated)")
    ap.add_argument("--captioner", default="existing", help="existing (default) or vllm (GPU, see data/captioners)")
    ap.add_argument("--vlm-model", default="Qwen/Qwen2-VL-7B-Instruct", help="vllm captioner: the VLM")
    ap.add_argument("--long-prompt", default="Describe this image in detail in one paragraph.", help="vllm captioner")
    ap.add_argument("--short-prompt", default="Describe this image in one short sentence.", help="vllm captioner")
    ap.add_argument("--control", nargs="+", default=[], choices=CONTROL_KINDS, metavar="KIND",
                    help="also store these control maps of each image for ControlNet training (edges: Canny; mask: the "
                         "foreground against the border colour; data/control.py), encoded like the image")
    ap.add_argument("--keep-images", action="store_true",
                    help="also store each sample's pixels (uint8, the crop its latent encodes) for REPA (train.repa), which then "
                         "reads them instead of decoding every latent; about 6x an SD3 latent's storage at 256 px")
    ap.add_argument("--samples-per-shard", type=int, default=1000, help="inputs per unit of work (= per shard)")
    ap.add_argument("--shuffle-seed", type=int, default=0,
                    help="inputs are cut into units in a permutation of their sorted order seeded by this, so shards made "
                         "from class folders hold every class; -1 keeps the sorted order. It arranges the inputs a run adds "
                         "to the plan; units planned earlier stay as they are")
    ap.add_argument("--batch-size", type=int, default=32, help="images per autoencoder batch")
    ap.add_argument("--rank", type=int, default=None, help="this worker (default: SLURM_ARRAY_TASK_ID, else 0)")
    ap.add_argument("--world-size", type=int, default=None, help="number of workers (default: SLURM_ARRAY_TASK_COUNT, else 1)")
    ap.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    args = ap.parse_args(argv)
    if not 0.0 <= args.max_skipped <= 1.0:
        ap.error(f"--max-skipped {args.max_skipped}: a fraction of the inputs, 0 to 1")
    if args.shuffle_seed < -1:
        ap.error(f"--shuffle-seed {args.shuffle_seed}: 0 or more, or -1 for the sorted order")
    if args.min_size is None:  # a number before it is recorded, so that reruns compare numbers
        args.min_size = default_min_size(args)
    return args


def default_min_size(args) -> int:
    """Half the output's shorter side: of --size, or of the smallest bucket's shorter side with --buckets."""
    side = args.size
    if args.buckets:
        from data.buckets import make_buckets

        try:
            side = min(min(hw) for hw in make_buckets(args.buckets, args.bucket_step))
        except ValueError as e:
            raise SystemExit(f"--buckets {args.buckets} --bucket-step {args.bucket_step}: {e}") from None
    return max(1, side // 2)


def main(argv=None) -> dict:
    args = parse_args(argv)
    rank, world = worker_position(args.rank, args.world_size)
    items, class_names = list_inputs(args.input)
    if not items:
        raise SystemExit(f"--input {args.input}: no images found")
    keys = [it.key for it in items]
    if len(set(keys)) != len(keys):
        raise SystemExit("two inputs map to the same sample key; rename one of them")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.force and rank == 0:
        clear(out)
    class_names = stable_labels(out, items, class_names)
    by_key = {it.key: it for it in items}
    plan = plan_units(out, {it.key: it.size for it in items}, settings_of(args), args.samples_per_shard, args.shuffle_seed,
                      class_names)
    units = [[by_key[k] for k in unit] for unit in plan]
    mine = [u for u in range(len(units)) if u % world == rank]
    for u in mine:  # left by a killed run of this worker (never another worker's): redone below
        (out / f".{UNIT_FORMAT.format(u)}.tar.tmp").unlink(missing_ok=True)
    todo = [u for u in mine if not unit_done(out, u)]
    print(f"{len(items)} inputs in {len(units)} units; worker {rank}/{world}: {len(mine)} units, {len(mine) - len(todo)} already done",
          flush=True)
    prep = Preparer(args)
    fields = {
        "autoencoder": args.autoencoder,
        "autoencoder_subfolder": args.autoencoder_subfolder,
        "scaling_factor": float(prep.ae.scaling_factor),
        "shift_factor": float(prep.ae.shift_factor),
        "text_encoder": ({"name": args.text_encoder, "max_length": args.max_length, "width": prep.text.width} if prep.text else None),
        "num_classes": len(class_names) or None,
        "class_names": class_names or None,
        "image_size": None if args.buckets else args.size,
        "bucket_spec": {"target_pixels": args.buckets, "step": args.bucket_step} if args.buckets else None,
        "held_out_captions": [],
        **({"controls": list(args.control)} if args.control else {}),
        **({"images": True} if args.keep_images else {}),  # <key>.image.npy: each sample's pixels (REPA's encoder input)
    }
    if prep.text is not None:
        from data.shards import write_null

        write_null(out, prep.text([""])[0])
    t0, done_inputs, written = time.time(), 0, 0
    reasons: dict[str, int] = {}
    bar = None
    if sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=sum(len(units[u]) for u in todo), unit="img")
    for u in todo:
        s = prep.run_unit(u, units[u], out)
        done_inputs += s["inputs"]
        written += s["num_samples"]
        for sk in s["skipped"]:
            reason = reason_of(sk["reason"])
            reasons[reason] = reasons.get(reason, 0) + 1
            print(f"skipped {sk['source']}: {sk['reason']}", flush=True)
        if bar is not None:
            bar.update(s["inputs"])
        else:
            rate = done_inputs / max(time.time() - t0, 1e-9)
            print(f"unit {u}: {s['num_samples']}/{s['inputs']} written | {done_inputs} inputs done, {rate:.1f} img/s", flush=True)
    if bar is not None:
        bar.close()
    dt = time.time() - t0
    manifest = write_manifest(out, len(units), fields)  # None until every worker's units are done
    complete = manifest is not None
    # the counts: the whole folder once it is complete, else this worker's units; earlier runs' units included
    totals = tally(out, range(len(units)) if complete else mine)
    summary = {"worker": rank, "world_size": world, "units": len(mine), "units_run": len(todo), "samples_written": written,
               "skipped": reasons, "seconds": round(dt, 1), "img_per_s": round(done_inputs / dt, 1) if dt > 0 else None,
               "manifest": bool(manifest and manifest["num_samples"]),
               "totals": {"of": "folder" if complete else "worker", **{k: totals[k] for k in ("inputs", "kept", "skipped")}}}
    print("summary: " + json.dumps(summary), flush=True)
    n = len(units) if complete else len(mine)
    where = f"{'the folder' if complete else 'this worker'}'s {n} unit{'s' * (n != 1)}"
    print(f"{describe(totals)} in {where} ({len(todo)} run now)", flush=True)
    if not complete:
        print("other workers' units are not finished yet; the last worker to finish writes manifest.json", flush=True)
    elif manifest["num_samples"]:
        print(f"manifest: {manifest['num_samples']} samples in {len(manifest['shards'])} shards, {manifest['skipped']} skipped, "
              f"buckets {manifest['buckets']}", flush=True)
    failed = verdict(totals, args, out) if complete else None
    if failed:
        raise SystemExit(failed)
    return summary


if __name__ == "__main__":
    warnings.simplefilter("default")
    main()
