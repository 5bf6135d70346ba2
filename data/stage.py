"""The shards a training stage reads, from its data config (``configs/data/*.yaml``).

The demo data is built on first use (``data.generate``: the shapes renderer, data/shapes.py);
a stage-5 style subset (``data.min_score``: samples whose ``scores[data.score_key]`` reach it) is
written once beside the full data. Only the main process writes; the others wait for it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from data.shards import ShardError, _iter_tar, read_manifest, write_subset


def stage_shards(data_cfg, seed: int, is_main: bool = True, wait: Callable[[], None] = lambda: None,
                 log: Callable[..., None] = print) -> tuple[Path, dict]:
    """(the shard folder to train on, its manifest), building what is missing."""
    path = Path(data_cfg.path)
    min_score = data_cfg.get("min_score")
    if min_score is None:
        if data_cfg.generate and not (path / "manifest.json").exists():
            if is_main:
                build_demo(data_cfg, path, seed, log)
            wait()
        return path, read_manifest(path)
    key = data_cfg.score_key
    subset = Path(f"{path}-{key}{min_score:g}")
    if is_main and not (subset / "manifest.json").exists():
        if data_cfg.generate and not (path / "manifest.json").exists():
            build_demo(data_cfg, path, seed, log)
        n = write_subset(path, subset, lambda meta: _score(meta, key) >= min_score)
        log(f"wrote the subset with {key} >= {min_score:g}: {n} samples in {subset}")
    wait()
    return subset, read_manifest(subset)


def build_demo(data_cfg, path: Path, seed: int, log: Callable[..., None] = print) -> None:
    """The shapes demo data, as the data config describes it (buckets for stage 4, captions and
    held-out combinations for the text stages)."""
    if data_cfg.get("name") != "shapes":
        raise ShardError(f"data.generate=true only builds the shapes demo data, not {data_cfg.get('name')!r}")
    from data.shapes import build_shards

    canvases = None
    spec = data_cfg.get("buckets")
    if spec:  # aspect-ratio buckets from a pixel count and a step (stage 4)
        from data.buckets import make_buckets

        canvases = make_buckets(int(spec.target_pixels), int(spec.step), float(spec.get("max_ratio", 4.0)))
    controls = None
    if data_cfg.get("control"):  # ControlNet data: every kind of control map, so a run may switch between them
        from data.control import CONTROL_KINDS

        controls = list(CONTROL_KINDS)
    log(f"building {data_cfg.num_samples} shapes samples into {path} (first use only)")
    build_shards(path, data_cfg.num_samples, data_cfg.image_size, seed=seed, text_encoder=data_cfg.get("text_encoder"),
                 max_length=data_cfg.get("max_length") or 16, holdout=bool(data_cfg.get("holdout", False)), canvases=canvases,
                 controls=controls)


def _score(meta: dict, key: str) -> float:
    value = (meta.get("scores") or {}).get(key)
    return float("-inf") if value is None else float(value)


def _captioned(path, manifest: dict):
    """(caption, the sample's tar members) of every sample with a caption, shard by shard in the manifest's order."""
    import json

    for shard in manifest.get("shards", []):
        for _, group in _iter_tar(Path(path) / shard["name"]):
            text = json.loads(group["json"]).get("caption") if "json" in group else None
            if text:
                yield text, group


def own_captions(path, manifest: dict, count: int, seed: int) -> list[str]:
    """``count`` distinct captions drawn (seeded) from the first shards' samples: the evaluation prompts
    of text data that holds none out. Reads only the samples' JSON, at most 2000 distinct captions."""
    import numpy as np

    seen: dict[str, None] = {}  # distinct, in the order read
    for text, _ in _captioned(path, manifest):
        seen[text] = None
        if len(seen) >= 2000:
            break
    captions = list(seen)
    if len(captions) <= count:
        return captions
    pick = np.random.default_rng(seed).choice(len(captions), count, replace=False)
    return [captions[i] for i in sorted(pick)]


def own_controls(path, manifest: dict, kind: str, count: int, size: tuple[int, int] | None = None) -> list[tuple[str, "np.ndarray"]]:
    """The first ``count`` samples with a distinct caption and their stored ``kind`` control map (raw
    latents, as stored): a ControlNet run's evaluation inputs. ``size`` (latent height, width): only
    maps of that canvas (bucketed data evaluates on its square bucket)."""
    from data.shards import load_npy

    found: dict[str, object] = {}
    for text, group in _captioned(path, manifest):
        member = f"control_{kind}.npy"
        if text not in found and member in group:
            raw = load_npy(group[member])
            if size is not None and tuple(raw.shape[-2:]) != tuple(size):
                continue
            found[text] = raw
            if len(found) >= count:
                break
    return list(found.items())
