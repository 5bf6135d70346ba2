"""Control maps for ControlNet: what data preparation derives from each image and stores in the shards.

A control map is an (H, W) float image in [0, 1] derived from the training image itself, so any
captioned image folder becomes ControlNet data:

  edges   Canny edges of the grey image (scikit-image ``feature.canny``), PixArt-δ's and ControlNet's
          first control; sigma scales with the image (``sigma_for``).
  mask    the foreground: pixels whose colour differs from the image's border colour (the median
          of the outermost ring) by more than an Otsu threshold (scikit-image ``filters.threshold_otsu``)
          on that difference. Good for objects on plain backgrounds (the demo, product shots).

The model sees a map as an image: grey, replicated to 3 channels, in [-1, 1] (``to_pixels``), then
through the same autoencoder as the training images, so it has the latents' shape.
"""
from __future__ import annotations

import numpy as np

CONTROL_KINDS = ("edges", "mask")


class ControlError(ValueError):
    """A control kind or control image that cannot be used; the message says what is expected."""


def check_kind(kind: str) -> str:
    if kind not in CONTROL_KINDS:
        raise ControlError(f"control kind {kind!r}: expected one of {CONTROL_KINDS}")
    return kind


def sigma_for(height: int, width: int) -> float:
    """Canny's Gaussian sigma in pixels: 0.5 up to 256 px, growing with the shorter side (1 at 512, 2 at 1024), at most 3."""
    side = min(height, width)
    return float(np.clip(side / 512.0, 0.5, 3.0))


def edges(image: np.ndarray) -> np.ndarray:
    """(H, W) float32 in {0, 1}: Canny edges of an (H, W, 3) uint8 image."""
    from skimage.color import rgb2gray
    from skimage.feature import canny

    grey = rgb2gray(np.asarray(image)[..., :3])
    return canny(grey, sigma=sigma_for(*grey.shape)).astype(np.float32)


def mask(image: np.ndarray) -> np.ndarray:
    """(H, W) float32 in {0, 1}: the pixels that differ from the border colour (Otsu on the difference).
    An image with no contrast to speak of (every pixel within 8/255 of the border) has no foreground."""
    from skimage.filters import threshold_otsu

    img = np.asarray(image)[..., :3].astype(np.float32)
    ring = np.concatenate([img[0], img[-1], img[1:-1, 0], img[1:-1, -1]])  # (perimeter, 3)
    distance = np.linalg.norm(img - np.median(ring, axis=0), axis=-1)  # (H, W)
    if distance.max() <= 8.0:
        return np.zeros(distance.shape, np.float32)
    return (distance > max(threshold_otsu(distance), 8.0)).astype(np.float32)


MAKERS = {"edges": edges, "mask": mask}


def control_map(kind: str, image: np.ndarray) -> np.ndarray:
    """The ``kind`` map of an (H, W, 3) uint8 image: (H, W) float32 in [0, 1]."""
    return MAKERS[check_kind(kind)](image)


def to_pixels(control: np.ndarray) -> np.ndarray:
    """(H, W) map in [0, 1] -> (3, H, W) float32 in [-1, 1], what the autoencoder encodes."""
    grey = np.asarray(control, dtype=np.float32) * 2.0 - 1.0
    return np.repeat(grey[None], 3, axis=0)


def from_image(image: np.ndarray) -> np.ndarray:
    """A control image a user gives (a map drawn or saved as a picture: (H, W), (H, W, 3) or (H, W, 4)
    uint8) -> (H, W) map in [0, 1]: its grey level."""
    img = np.asarray(image)
    if img.ndim == 3:
        img = img[..., :3].astype(np.float32).mean(-1)
    if img.ndim != 2:
        raise ControlError(f"a control image is a picture of shape (H, W) or (H, W, 3), not {tuple(np.asarray(image).shape)}")
    return (img.astype(np.float32) / 255.0).clip(0, 1)


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two masks (> 0.5 counts as inside); two empty masks agree (1.0)."""
    a, b = np.asarray(a) > 0.5, np.asarray(b) > 0.5
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)
