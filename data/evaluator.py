"""Deterministic evaluator for the shapes demo: which attributes does an image show?

It estimates the background from the border, segments pixels far from it, and
reads the attributes off the foreground:
- colour: the palette colour nearest to the foreground's median colour;
- shape: fill ratio of the foreground inside its bounding box (square ~1.0,
  circle ~pi/4 = 0.785) and how bottom-heavy it is (an apex-up triangle has ~3x
  more area in its lower half; circles and squares are symmetric);
- size: bounding-box side relative to the canvas (small 0.42, large 0.72);
- background: the nearest background colour to the border's median.
A blurry, noisy or empty sample fails (no plain border, too little foreground,
a foreground of mixed colours, or a non-square bounding box), which is the
point: the score rewards sharp, obedient samples.
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from data.shapes import BACKGROUNDS, CLASSES, COLOURS, SIZES

_FG_DISTANCE = 60.0  # RGB distance (0..255 scale) from the background that counts as foreground
_MIN_AREA = 0.03  # fraction of the canvas a shape must cover
_SQUARE_FILL, _CIRCLE_FILL = 0.89, 0.64  # fill ratio in the bounding box: square ~1, circle ~0.785
_TRIANGLE_SKEW = 1.8  # lower-half / upper-half area: triangle (apex up) ~3, circle and square 1
_SIZE_SPLIT = (SIZES["small"] + SIZES["large"]) / 2
_BORDER_CLEAN = 0.9  # fraction of border pixels that must match the background (a plain backdrop)
_COLOUR_RADIUS, _COLOUR_COHERENT = 100.0, 0.6  # most of the shape must be near one palette colour


def _to_uint8_hwc(image) -> np.ndarray:
    """Accept (H, W, 3) uint8, or a float array/tensor (3, H, W) or (H, W, 3) in [-1, 1]."""
    if hasattr(image, "detach"):
        image = image.detach().float().cpu().numpy()
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[0] == 3 and image.shape[-1] != 3:
        image = image.transpose(1, 2, 0)
    if image.dtype != np.uint8:
        image = np.clip((image + 1) * 127.5, 0, 255)
    return image.astype(np.float32)


def _nearest(value: np.ndarray, palette: dict[str, tuple[int, int, int]]) -> str:
    names = list(palette)
    dists = [np.linalg.norm(value - np.array(palette[n], dtype=np.float32)) for n in names]
    return names[int(np.argmin(dists))]


def evaluate_image(image, colours: dict | None = None) -> dict[str, str | None]:
    """Attributes shown by one image: {shape, colour, size, background}; None where unreadable.
    ``colours``: the palette to read (default the demo's four)."""
    colours = colours or COLOURS
    img = _to_uint8_hwc(image)
    h, w, _ = img.shape
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
    bg = np.median(border, axis=0)
    out: dict[str, str | None] = {"background": _nearest(bg, BACKGROUNDS), "shape": None, "colour": None, "size": None}
    if (np.linalg.norm(border - bg, axis=-1) <= _FG_DISTANCE).mean() < _BORDER_CLEAN:
        return out  # no plain background: noise or clutter, not a demo image
    mask = np.linalg.norm(img - bg, axis=-1) > _FG_DISTANCE
    area = mask.sum()
    if area < _MIN_AREA * h * w:
        return out
    colour = _nearest(np.median(img[mask], axis=0), colours)
    near = np.linalg.norm(img[mask] - np.array(colours[colour], dtype=np.float32), axis=-1) < _COLOUR_RADIUS
    if near.mean() < _COLOUR_COHERENT:
        return out  # a smear of colours, not one shape
    out["colour"] = colour
    rows, cols = np.nonzero(mask.any(1))[0], np.nonzero(mask.any(0))[0]
    bh, bw = rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1
    if max(bh, bw) > 1.35 * min(bh, bw):  # every demo shape has a square bounding box
        return out
    fill = area / float(bh * bw)
    box = mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    top, bottom = box[: bh // 2].sum(), box[bh - bh // 2 :].sum()
    if fill > _SQUARE_FILL:
        out["shape"] = "square"
    elif bottom > _TRIANGLE_SKEW * max(top, 1):  # apex up: most of a triangle's area is in its lower half
        out["shape"] = "triangle"
    elif fill > _CIRCLE_FILL:
        out["shape"] = "circle"
    out["size"] = "large" if (bh + bw) / 2 / min(h, w) > _SIZE_SPLIT else "small"
    return out


def classify(image) -> int | None:
    """Stage-1 class id (shape, colour) shown by the image, or None."""
    a = evaluate_image(image)
    key = (a["shape"], a["colour"])
    return CLASSES.index(key) if key in CLASSES else None


def class_accuracy(images, labels) -> float:
    """Fraction of images whose evaluated (shape, colour) class equals the label."""
    return class_attribute_accuracy(images, labels)["all"]


def class_attributes(labels) -> list[dict[str, str]]:
    """Stage-1 class ids -> the attributes each names: [{shape, colour}, ...]."""
    return [dict(zip(("shape", "colour"), CLASSES[int(y)])) for y in labels]


def class_attribute_accuracy(images, labels) -> dict[str, float]:
    """For stage-1 class labels: accuracy of the shape, of the colour, and of both ('all')."""
    return attribute_accuracy(images, class_attributes(labels))


def attribute_accuracy(images, attributes: list[dict[str, str]], colours: dict | None = None) -> dict[str, float]:
    """Per-attribute accuracy and 'all' (every named attribute right) over a batch."""
    keys = list(attributes[0]) if attributes else []
    hits = {k: 0 for k in keys + ["all"]}
    for img, want in zip(images, attributes):
        got = evaluate_image(img, colours)
        ok = [got.get(k) == v for k, v in want.items()]
        for k, good in zip(want, ok):
            hits[k] += good
        hits["all"] += all(ok)
    n = max(len(attributes), 1)
    return {k: v / n for k, v in hits.items()}


class ShapesEvaluator:
    """Scores images of the shapes demo against what each should show, given in words: a class name
    ("red circle") or a caption ("a small red circle on a black background"). Returns 'all' (every
    named attribute right) and per-attribute accuracy."""

    name = "shapes"

    def __init__(self, new_colours: bool = False):
        from data.shapes import ALL_COLOURS

        self.colours = ALL_COLOURS if new_colours else COLOURS  # new_colours: also read the colours no demo data shows

    def targets(self, descriptions: list[str]) -> list[dict[str, str]]:
        from data.shapes import parse_caption

        targets = [parse_caption(d, self.colours) for d in descriptions]
        unreadable = [d for d, t in zip(descriptions, targets) if "shape" not in t or "colour" not in t]
        if unreadable:
            raise ValueError(f"the shapes evaluator reads a shape and a colour from each description; these name none: {unreadable[:3]}")
        return targets

    def score(self, images, descriptions: list[str]) -> dict[str, float]:
        return attribute_accuracy(images, self.targets(descriptions), self.colours)


EVALUATORS = {"shapes": ShapesEvaluator}


def make_evaluator(spec=None, decode=None):
    """The evaluator a data config names (``data.evaluator``); None: sample grids only.

    ``spec`` is a name (``shapes``) or a mapping naming the kind and its settings, for evaluators that
    need some: ``{kind: fid, reference: PATH, weights: null, max_reference: 5000, kid_subset_size: 1000,
    clip_model: null}`` (data/fid.py: FID and KID against real images, CLIP score given a CLIP model).
    ``decode``: for an FID reference of latent shards, the stored latents -> images in [-1, 1]."""
    if spec is None:
        return None
    fid_form = "data.evaluator={kind: fid, reference: PATH} (a shard folder or a folder of PNG/JPEG images; settings in data/fid.py)"
    if isinstance(spec, str):
        if spec == "fid":
            raise ValueError(f"data.evaluator=fid needs the real images it compares against: write it as {fid_form}")
        if spec not in EVALUATORS:
            raise ValueError(f"data.evaluator={spec!r}: expected one of {sorted(EVALUATORS)}, {fid_form}, or null (grids only)")
        return EVALUATORS[spec]()
    if not isinstance(spec, Mapping):
        raise ValueError(f"data.evaluator={spec!r}: expected a name ({sorted(EVALUATORS)}), {fid_form}, or null")
    settings = {k: v for k, v in spec.items() if k != "kind"}
    kind = spec.get("kind")
    if kind in EVALUATORS and not settings:
        return EVALUATORS[kind]()
    if kind != "fid":
        raise ValueError(f"data.evaluator.kind={kind!r}: expected fid (with settings) or one of {sorted(EVALUATORS)}")
    from data.fid import FIDEvaluator

    allowed = {"reference", "weights", "max_reference", "kid_subset_size", "kid_subsets", "clip_model", "batch_size"}
    unknown = sorted(set(settings) - allowed)
    if unknown:
        raise ValueError(f"data.evaluator (kind fid): unknown settings {unknown}; expected some of {sorted(allowed)}")
    if settings.get("reference") in (None, ""):
        raise ValueError(f"data.evaluator.reference is missing: FID compares samples with real images; set {fid_form}")
    return FIDEvaluator(decode=decode, **settings)
