"""Evaluation: sample a grid for a list of conditions and score it with the data's evaluator.

The trainer's periodic evaluation and ``scripts/evaluate_checkpoint.py`` both call
:func:`evaluate`. Which evaluator scores the images is the data's business (``data.evaluator``:
``shapes`` for the demo data, null for data without one: grids only); the conditioning says what
each sample should show, in words (a class name, a prompt).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from inference.conditioning import Conditioning
from inference.images import make_grid, save_png, to_uint8
from inference.pipeline import SampleSettings, generate, initial_noise


@dataclass
class EvalSpec:
    """values: the conditions to cycle through (the grid's columns: classes or prompts).
    samples: how many to draw when an evaluator scores them (at least two per value).
    settings: sampling settings. evaluator: a ``data.evaluator`` object or None (grids only).
    aspects: [(height, width), ...] in pixels: one grid and one score per size (suffix _HxW),
    the headline scores their mean; empty: the model's own size (``latent_shape``)."""

    values: list
    samples: int
    settings: SampleSettings
    latent_shape: tuple[int, int, int]
    evaluator: Any = None
    aspects: list[tuple[int, int]] = field(default_factory=list)
    downsample: int = 1
    batch: int = 1024  # samples per sampling call: an FID evaluation of thousands must not sample them all at once


def evaluate(model: nn.Module, autoencoder: nn.Module, conditioning: Conditioning, spec: EvalSpec, device,
             out_png: Path | None) -> dict[str, Any]:
    """Sample grid (PNG) and, with an evaluator, its accuracy: per attribute, and the conditioning's
    headline (``class_accuracy`` for class labels, ``caption_accuracy`` for text: every named attribute right)."""
    if not spec.aspects:
        return _evaluate_at(model, autoencoder, conditioning, spec, spec.latent_shape, device, out_png)
    result: dict[str, Any] = {}
    per: list[dict] = []
    for h, w in spec.aspects:
        png = None if out_png is None else out_png.with_name(f"{out_png.stem}_{h}x{w}.png")
        shape = (spec.latent_shape[0], h // spec.downsample, w // spec.downsample)
        r = _evaluate_at(model, autoencoder, conditioning, spec, shape, device, png)
        per.append(r)
        result.update({f"{k}_{h}x{w}": v for k, v in r.items()})
    for k in per[0]:
        if isinstance(per[0][k], float):
            result[k] = sum(r[k] for r in per) / len(per)
    return result


def _evaluate_at(model, autoencoder, conditioning: Conditioning, spec: EvalSpec, latent_shape, device, out_png) -> dict:
    columns = len(spec.values)
    if spec.evaluator is None:  # a grid only: four rows of the columns it shows
        n = 4 * min(columns, 16)
    elif getattr(spec.evaluator, "per_condition", True):  # scores each condition (shapes): at least two samples per value
        n = max(spec.samples, 2 * columns)
    else:  # scores the set as a whole (FID): exactly the samples asked for
        n = spec.samples
    chosen = [spec.values[i % columns] for i in range(n)]
    noise = initial_noise(n, latent_shape, spec.settings.seed, device)  # for all n first: the images do not depend on spec.batch
    parts = []
    for i in range(0, n, spec.batch):
        cond, uncond = conditioning.guided(chosen[i:i + spec.batch], device)
        parts.append(generate(model, autoencoder, cond, uncond, latent_shape, spec.settings, device, noise=noise[i:i + spec.batch]))
    images = torch.cat(parts)
    result: dict[str, Any] = {}
    if spec.evaluator is not None:
        scores = spec.evaluator.score(images, [conditioning.describe(v) for v in chosen])
        if "all" in scores:  # attribute accuracy (shapes): the headline under the conditioning's name
            result[conditioning.accuracy_name] = scores.pop("all")
            result.update({f"{k}_accuracy": v for k, v in scores.items()})
        else:  # scores of the whole set (fid, kid, ...), as the evaluator names them
            result.update(scores)
    result.update(conditioning.agreement(images, chosen))  # a ControlNet: does the image follow its control?
    if out_png is not None:
        k = min(columns, 16)  # one column per class or prompt, four rows of seeds
        idx = [i for r in range(4) for i in range(r * columns, r * columns + k) if i < n]
        save_png(make_grid(to_uint8(images[idx]), ncols=k, upscale=max(1, 96 // max(images.shape[-2:]))), out_png)
        result["grid"] = str(out_png)
    return result
