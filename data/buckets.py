"""Aspect-ratio buckets from a target pixel count and a step size (no pasted tables).

``make_buckets(target_pixels=256**2, step=32)`` lists every (height, width) with both
sides multiples of ``step``, area within ``tolerance`` of the target (never above it)
and aspect ratio within ``max_ratio``; for each height it keeps the widest width that
fits, and every bucket's transpose. ``nearest_bucket`` picks the bucket whose log aspect ratio is closest.
"""
from __future__ import annotations

import math


def make_buckets(target_pixels: int, step: int, max_ratio: float = 4.0, tolerance: float = 0.2) -> list[tuple[int, int]]:
    if target_pixels <= 0 or step <= 0:
        raise ValueError(f"target_pixels and step must be positive, got {target_pixels}, {step}")
    out = []
    h = step
    while h * step <= target_pixels:
        w = (target_pixels // h) // step * step
        if w >= step and max(h / w, w / h) <= max_ratio and h * w >= (1 - tolerance) * target_pixels:
            out.append((h, w))
        h += step
    if not out:
        raise ValueError(f"no bucket of about {target_pixels} pixels with sides multiple of {step}")
    out += [(w, h) for h, w in out]  # portrait and landscape alike
    return sorted(set(out), key=lambda hw: (hw[0] / hw[1], hw[0]))


def nearest_bucket(height: int, width: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    r = math.log(height / width)
    return min(buckets, key=lambda hw: (abs(math.log(hw[0] / hw[1]) - r), -hw[0] * hw[1]))
