"""Data preparation reruns that add up: the same settings resume, new inputs are added once, other
settings are refused; oversized images are skipped from their header; 16-bit images are scaled."""
import tarfile

import numpy as np
import pytest
from PIL import Image

from data.prepare import load_rgb, main as prepare
from data.shards import read_manifest


def _images(folder, n, start=0):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(start, start + n):
        rng = np.random.default_rng(i)
        Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(folder / f"img{i:03d}.png")


def _keys(out):
    keys = []
    for shard in sorted(out.glob("shard-*.tar")):
        with tarfile.open(shard) as tar:
            keys += [m.name.split(".")[0] for m in tar if m.name.endswith(".latent.npy")]
    return keys


def _args(src, out, *extra):
    return ["--input", str(src), "--out", str(out), "--size", "16", "--min-size", "16", *extra]


def test_other_settings_are_refused_and_force_starts_afresh(tmp_path):
    _images(tmp_path / "in", 21)
    out = tmp_path / "out"
    prepare(_args(tmp_path / "in", out, "--samples-per-shard", "5"))
    before = sorted(p.read_bytes() for p in out.glob("shard-*.tar"))
    with pytest.raises(SystemExit, match=r"other settings .*samples_per_shard.*\(5, 3\)"):
        prepare(_args(tmp_path / "in", out, "--samples-per-shard", "3"))
    with pytest.raises(SystemExit, match=r"other settings .*'size': \(16, 32\)"):
        prepare(["--input", str(tmp_path / "in"), "--out", str(out), "--size", "32", "--min-size", "16", "--samples-per-shard", "5"])
    assert sorted(p.read_bytes() for p in out.glob("shard-*.tar")) == before  # nothing touched
    prepare(_args(tmp_path / "in", out, "--samples-per-shard", "3", "--force"))
    m = read_manifest(out)
    assert m["num_samples"] == 21 and len(m["shards"]) == 7 and len(set(_keys(out))) == 21


def test_new_inputs_are_added_once_and_nothing_is_redone(tmp_path):
    _images(tmp_path / "in", 21)
    out = tmp_path / "out"
    prepare(_args(tmp_path / "in", out, "--samples-per-shard", "5"))
    first = {p.name: p.read_bytes() for p in out.glob("shard-*.tar")}
    _images(tmp_path / "in", 7, start=100)  # new files sorting after the old ones ...
    _images(tmp_path / "in", 2, start=55)  # ... and between them
    summary = prepare(_args(tmp_path / "in", out, "--samples-per-shard", "5"))
    keys = _keys(out)
    assert len(keys) == len(set(keys)) == 30 and read_manifest(out)["num_samples"] == 30
    assert all((out / name).read_bytes() == data for name, data in first.items())  # the first run's shards as they were
    assert summary["units_run"] == 2  # only the new inputs' units


def test_inputs_of_the_earlier_run_that_are_gone_or_changed_are_refused(tmp_path):
    _images(tmp_path / "in", 6)
    out = tmp_path / "out"
    prepare(_args(tmp_path / "in", out, "--samples-per-shard", "3"))
    Image.new("RGB", (40, 40), (9, 9, 9)).save(tmp_path / "in" / "img004.png")  # another image under the same name
    with pytest.raises(SystemExit, match="1 input.* changed since the earlier run"):
        prepare(_args(tmp_path / "in", out, "--samples-per-shard", "3"))
    (tmp_path / "in" / "img002.png").unlink()
    with pytest.raises(SystemExit, match="1 input.* of the earlier run .* are not among the inputs now"):
        prepare(_args(tmp_path / "in", out, "--samples-per-shard", "3"))


def test_an_oversized_image_is_skipped_from_its_header(tmp_path):
    _images(tmp_path / "in", 2)
    Image.new("L", (1_000_000, 64), 128).save(tmp_path / "in" / "strip.png")  # 64M pixels, a small file
    summary = prepare(_args(tmp_path / "in", tmp_path / "out"))
    assert summary["samples_written"] == 2 and summary["skipped"] == {"too large": 1}


def test_high_bit_depth_images_are_scaled_not_clipped():
    import io

    ramp = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)  # 0 .. 65520
    buf = io.BytesIO()
    Image.fromarray(ramp).save(buf, format="PNG")
    rgb = np.asarray(load_rgb(buf.getvalue()), dtype=np.float64)
    assert rgb.shape == (64, 64, 3)
    np.testing.assert_allclose(rgb[..., 0], np.round(ramp / 65535 * 255), atol=1)
    assert (rgb == 255).mean() < 0.01  # clipping made 95% of such an image white
