"""The model registry: the only legal model names.

A preset fixes the transformer's shape (width, depth, heads, patch size); what
depends on the data (input size, channels, number of classes, text width) comes
from the data config and is passed to :func:`build_model`.
"""
from __future__ import annotations

from typing import Any

import torch.nn as nn

from models.ccdit import CCDiT, CCDiTConfig
from models.layers import check_transformer_shape
from models.mmdit import MMDiT, MMDiTConfig

_DIT = dict(mlp_ratio=4.0)
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "ccdit": {
        "XL/2": dict(_DIT, depth=28, hidden_size=1152, num_heads=16, patch_size=2),
        "L/2": dict(_DIT, depth=24, hidden_size=1024, num_heads=16, patch_size=2),
        "B/2": dict(_DIT, depth=12, hidden_size=768, num_heads=12, patch_size=2),
        "S/2": dict(_DIT, depth=12, hidden_size=384, num_heads=6, patch_size=2),
        # The CPU demo model (see README "The demo"): 1.8M parameters, 64 tokens on 16x16 pixels.
        "demo": dict(_DIT, depth=6, hidden_size=128, num_heads=4, patch_size=2),
        # Small pixel-space data (32x32 images, autoencoder none): the demo's shape with 4x4 patches, 64 tokens.
        "small/4": dict(_DIT, depth=6, hidden_size=128, num_heads=4, patch_size=4),
        # Unit tests: milliseconds per forward.
        "tiny": dict(_DIT, depth=2, hidden_size=32, num_heads=2, patch_size=2),
    },
    "mmdit": {
        # PixArt-alpha XL/2 (diffusers-compatible: QK-norm off, GELU-tanh MLP ratio 4)
        "PixArt-alpha-XL/2": dict(_DIT, depth=28, hidden_size=1152, num_heads=16, patch_size=2, qk_norm=False),
        "XL/2": dict(_DIT, depth=28, hidden_size=1152, num_heads=16, patch_size=2),
        "B/2": dict(_DIT, depth=12, hidden_size=768, num_heads=12, patch_size=2),
        "S/2": dict(_DIT, depth=12, hidden_size=384, num_heads=6, patch_size=2),
        "demo": dict(_DIT, depth=6, hidden_size=128, num_heads=4, patch_size=2),
        "small/4": dict(_DIT, depth=6, hidden_size=128, num_heads=4, patch_size=4),
        "tiny": dict(_DIT, depth=2, hidden_size=32, num_heads=2, patch_size=2),
    },
}

# The shape a preset fixes and a config may change on top of it (model.patch_size=4, model.depth=8, ...).
SHAPE_KEYS = ("patch_size", "depth", "hidden_size", "num_heads", "mlp_ratio")

MODEL_CLASSES = {"ccdit": (CCDiT, CCDiTConfig), "mmdit": (MMDiT, MMDiTConfig)}


def preset_fields(family: str, preset: str) -> dict[str, Any]:
    """The shape a preset fixes; ValueError naming the legal names."""
    if family not in PRESETS:
        raise ValueError(f"unknown model family {family!r}; expected one of {sorted(PRESETS)}")
    if preset not in PRESETS[family]:
        raise ValueError(f"unknown {family} preset {preset!r}; expected one of {sorted(PRESETS[family])}")
    return dict(PRESETS[family][preset])


def check_shape(family: str, preset: str, input_size: int, overrides: dict[str, Any] | None = None) -> None:
    """The preset, with ``overrides`` of its shape, at this latent size obeys the shape rules (before
    anything is built or read)."""
    p = preset_fields(family, preset) | dict(overrides or {})
    check_transformer_shape(input_size, p["patch_size"], p["hidden_size"], p["num_heads"])
    if p["depth"] < 1 or p["mlp_ratio"] <= 0:
        raise ValueError(f"depth must be at least 1 and mlp_ratio positive (got depth={p['depth']}, mlp_ratio={p['mlp_ratio']})")


def model_config(family: str, preset: str, **fields: Any):
    """Config dataclass for ``family`` / ``preset`` with data-dependent ``fields`` filled in."""
    _, config_cls = MODEL_CLASSES[family]
    return config_cls(**{**preset_fields(family, preset), **fields})


# Keys older checkpoints' model configs carry that are no longer architecture: precision.linear
# (now applied after construction, models/linear.py convert).
RETIRED_KEYS = ("linear_backend",)


def config_from_dict(family: str, config: dict[str, Any]):
    """The config dataclass from the dict a checkpoint saved (any version of it)."""
    _, config_cls = MODEL_CLASSES[family]
    config = {k: v for k, v in config.items() if k not in RETIRED_KEYS}
    if config.get("micro_conditions") and config.get("micro_embedder") is None:
        config["micro_embedder"] = "mlp"  # saved before the PixArt-MS layout existed: their embedder is the one MLP
    return config_cls(**config)


def build_model(family: str, config: dict[str, Any] | Any) -> nn.Module:
    """Instantiate ``family`` (plain nn.Linear layers) from a config dataclass or the dict saved in a checkpoint."""
    model_cls, _ = MODEL_CLASSES[family]
    if isinstance(config, dict):
        config = config_from_dict(family, config)
    return model_cls(config)


def parameter_count(family: str, config: dict[str, Any] | Any) -> int:
    """Parameters of the model a config describes, counted on the meta device: nothing is allocated."""
    import torch

    with torch.device("meta"):
        return count_parameters(build_model(family, config))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
