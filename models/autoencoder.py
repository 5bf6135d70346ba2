"""Autoencoders: where latents come from and how they are scaled.

``load_autoencoder("none")`` is pixel space (identity; for CPU demos and small
experiments). Anything else is a diffusers ``AutoencoderKL`` by hub id or local
folder (the SD3 VAE: 16 channels, 8x downsampling). Latent normalization is
    z = (posterior_mean - shift_factor) * scaling_factor
with both numbers read from the VAE's own config, never typed by hand.
Shards store the raw posterior mean; ``normalize`` is applied at train time.
"""
from __future__ import annotations

import torch
import torch.nn as nn


class PixelSpace(nn.Module):
    """The identity autoencoder: images in [-1, 1] are the latents."""

    name = "none"
    scaling_factor = 1.0
    shift_factor = 0.0
    downsample = 1

    def __init__(self, channels: int = 3):
        super().__init__()
        self.latent_channels = channels

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return images

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z.clamp(-1, 1)

    def normalize(self, raw: torch.Tensor) -> torch.Tensor:
        return raw

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        return z


class DiffusersVAE(nn.Module):
    """A frozen diffusers ``AutoencoderKL`` with its config's scaling and shift."""

    def __init__(self, name_or_path: str, subfolder: str | None = None, dtype: torch.dtype = torch.float32):
        super().__init__()
        from diffusers import AutoencoderKL  # slow import, only when a VAE is used

        kwargs = {"subfolder": subfolder} if subfolder else {}
        self.vae = AutoencoderKL.from_pretrained(name_or_path, torch_dtype=dtype, **kwargs).eval().requires_grad_(False)
        cfg = self.vae.config
        self.name = name_or_path if not subfolder else f"{name_or_path}:{subfolder}"
        self.scaling_factor = float(cfg.scaling_factor)
        self.shift_factor = float(getattr(cfg, "shift_factor", None) or 0.0)
        self.latent_channels = int(cfg.latent_channels)
        self.downsample = 2 ** (len(cfg.block_out_channels) - 1)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in [-1, 1] -> raw posterior mean (N, C, H/f, W/f), unscaled."""
        return self.vae.encode(images.to(self.vae.dtype)).latent_dist.mean

    def normalize(self, raw: torch.Tensor) -> torch.Tensor:
        return (raw - self.shift_factor) * self.scaling_factor

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        return z / self.scaling_factor + self.shift_factor

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Normalized latents -> images (N, 3, H, W) in [-1, 1]."""
        return self.vae.decode(self.denormalize(z).to(self.vae.dtype)).sample.float().clamp(-1, 1)


def load_autoencoder(name: str, subfolder: str | None = None, dtype: torch.dtype = torch.float32) -> nn.Module:
    """``"none"`` -> pixel space; otherwise a diffusers AutoencoderKL by hub id or local path."""
    if name in (None, "none"):
        return PixelSpace()
    return DiffusersVAE(name, subfolder=subfolder, dtype=dtype)


def autoencoder_downsample(name: str, subfolder: str | None = None) -> int:
    """Pixels per latent of an autoencoder, from its config alone (no weights loaded)."""
    if name in (None, "none"):
        return PixelSpace.downsample
    from diffusers import AutoencoderKL

    cfg = AutoencoderKL.load_config(name, **({"subfolder": subfolder} if subfolder else {}))
    return 2 ** (len(cfg["block_out_channels"]) - 1)
