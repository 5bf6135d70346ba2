"""The autoencoder wrapper, on a tiny SD3-like AutoencoderKL built and saved locally (no hub)."""
import pytest
import torch

from models.autoencoder import PixelSpace, load_autoencoder


def test_vae_scaling_comes_from_its_config(tiny_vae_dir):
    ae = load_autoencoder(str(tiny_vae_dir))
    assert (ae.scaling_factor, ae.shift_factor) == (1.5305, 0.0609)
    assert ae.latent_channels == 16 and ae.downsample == 8
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    raw = ae.encode(x)
    assert raw.shape == (2, 16, 4, 4)
    z = ae.normalize(raw)
    torch.testing.assert_close(z, (raw - 0.0609) * 1.5305)
    torch.testing.assert_close(ae.denormalize(z), raw)
    img = ae.decode(z)
    assert img.shape == (2, 3, 32, 32) and img.abs().max() <= 1
    # decode() takes normalized latents: it must equal the raw VAE decoding of the denormalized ones
    torch.testing.assert_close(img, ae.vae.decode(raw).sample.clamp(-1, 1))


def test_pixel_space_is_the_identity():
    ae = load_autoencoder("none")
    assert isinstance(ae, PixelSpace) and ae.downsample == 1 and ae.latent_channels == 3
    x = torch.rand(1, 3, 8, 8) * 2 - 1
    assert torch.equal(ae.decode(ae.normalize(ae.encode(x))), x)


def test_missing_vae_folder_is_an_error(tmp_path):
    with pytest.raises(Exception, match="nope"):
        load_autoencoder(str(tmp_path / "nope"))
