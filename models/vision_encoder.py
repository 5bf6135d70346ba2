"""A frozen pretrained vision encoder's patch features: REPA's target (DINOv2 in the paper; any
transformers ViT-like model: DINOv2 with or without registers, CLIP or SigLIP's image tower), by hub
id or local folder. Remote code is never run.

``VisionEncoder(name)(images, grid)`` -> (N, gh * gw, D): the image resized so that the encoder's
patches fall on the diffusion model's token grid (``grid`` = (gh, gw) tokens: an input of
gh * patch x gw * patch pixels), so the two token sequences line up one to one without resampling
features; the encoder's position embedding is interpolated to that size, as DINOv2 does.
"""
from __future__ import annotations

import inspect
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # DINOv2's, the default without a preprocessor config


class VisionEncoderError(ValueError):
    """An encoder that cannot be loaded or used: the message says what to give instead."""


def _looks_local(name: str) -> bool:
    """A folder rather than a hub id (``org/name``: one slash)."""
    return name.startswith(("/", "./", "../", "~")) or name.count("/") >= 2 or Path(name).expanduser().exists()


class VisionEncoder(nn.Module):
    def __init__(self, name_or_path: str, subfolder: str | None = None, dtype: torch.dtype = torch.float32):
        super().__init__()
        from transformers import AutoModel

        where = Path(name_or_path).expanduser()
        local = _looks_local(name_or_path)
        if local and not (where / (subfolder or "") / "config.json").is_file():
            raise VisionEncoderError(f"vision encoder {name_or_path!r}: no config.json in {(where / (subfolder or '')).absolute()}; "
                                     "give a local folder saved by save_pretrained (for the demo: python "
                                     "scripts/train_demo_encoder.py --out FOLDER), or a hub id such as facebook/dinov2-base")
        source = str(where) if local else name_or_path
        try:
            model = AutoModel.from_pretrained(source, subfolder=subfolder or "", dtype=dtype)
        except (OSError, ValueError) as e:
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            hint = ("is the folder one that save_pretrained wrote?" if local else
                    f"there is no local folder {str(where.absolute())!r}, so it was taken for a hub id, which is downloaded "
                    "once into the hub cache; on a machine without the hub, save the model and its image processor with "
                    "save_pretrained where they can be downloaded, and give that folder")
            raise VisionEncoderError(f"vision encoder {name_or_path!r} cannot be loaded ({first}): {hint}") from e
        model = getattr(model, "vision_model", model)  # CLIP / SigLIP: the image tower
        config = model.config
        if getattr(config, "patch_size", None) is None or getattr(config, "hidden_size", None) is None:
            raise VisionEncoderError(f"vision encoder {name_or_path!r} ({type(model).__name__}) has no patch_size / hidden_size: "
                                     "expected a ViT-like image encoder (DINOv2, CLIP, SigLIP)")
        self.model = model.eval().requires_grad_(False)
        self.name, self.patch_size, self.width = name_or_path, int(config.patch_size), int(config.hidden_size)
        self._interpolate = "interpolate_pos_encoding" in inspect.signature(model.forward).parameters
        mean, std, self.normalization = _normalization(source, subfolder)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self._check_tokens()

    def _check_tokens(self) -> None:
        """One patch token per grid cell, after at most the CLS and register tokens: what REPA pairs with the model's
        tokens. A masking (ViTMAE) or merging (Swin) encoder gives something else."""
        grid = (2, 3)
        try:
            out = self(torch.zeros(1, 3, 8, 8, device=self.mean.device), grid, check=False)
        except Exception as e:  # noqa: BLE001 - any failure here means: not a plain ViT
            raise VisionEncoderError(f"vision encoder {self.name!r} ({type(self.model).__name__}) fails on a 2x3 patch image "
                                     f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}): expected a plain ViT "
                                     "(DINOv2, CLIP, SigLIP)") from e
        extra = out.shape[1] - grid[0] * grid[1]
        allowed = 1 + int(getattr(self.model.config, "num_register_tokens", 0) or 0)
        if not 0 <= extra <= allowed or out.shape[2] != self.width:
            raise VisionEncoderError(f"vision encoder {self.name!r} ({type(self.model).__name__}) gives {out.shape[1]} tokens of "
                                     f"width {out.shape[2]} for a 2x3 patch image; expected 6 patch tokens (plus at most CLS and "
                                     f"registers) of width {self.width}: a plain ViT (DINOv2, CLIP, SigLIP)")

    def train(self, mode: bool = True) -> "VisionEncoder":
        return super().train(False)  # frozen: dropout and the like stay off

    @torch.no_grad()
    def forward(self, images: torch.Tensor, grid: tuple[int, int], check: bool = True) -> torch.Tensor:
        """(N, 3, H, W) images in [-1, 1] -> (N, gh * gw, D) patch features, row by row like the diffusion model's tokens."""
        gh, gw = grid
        x = F.interpolate((images.float() + 1) / 2, size=(gh * self.patch_size, gw * self.patch_size), mode="bicubic",
                          align_corners=False).clamp(0, 1)
        x = ((x - self.mean) / self.std).to(next(self.model.parameters()).dtype)
        hidden = self.model(pixel_values=x, **({"interpolate_pos_encoding": True} if self._interpolate else {})).last_hidden_state
        return hidden[:, -gh * gw:].float() if check else hidden  # the patch tokens, after any CLS and register tokens


def _normalization(source: str, subfolder: str | None) -> tuple[tuple, tuple, str]:
    """The encoder's own image mean and std (its preprocessor config), else ImageNet's; and which it was."""
    from transformers import AutoImageProcessor

    try:
        processor = AutoImageProcessor.from_pretrained(source, subfolder=subfolder or "")
        return tuple(processor.image_mean), tuple(processor.image_std), "its preprocessor config's mean and std"
    except (OSError, ValueError, AttributeError, TypeError):
        return IMAGENET_MEAN, IMAGENET_STD, "ImageNet's mean and std (no preprocessor config)"
