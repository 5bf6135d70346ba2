import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import compose, tiny_overrides
from models.presets import build_model, model_config
from training.optim import lr_at, param_groups


def test_no_weight_decay_on_norms_biases_embeddings():
    model = build_model("ccdit", model_config("ccdit", "tiny", input_size=8, in_channels=3, num_classes=4))
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert "blocks.0.attn.to_q.weight" in decayed and "blocks.0.mlp.fc1.weight" in decayed
    assert not any(n.endswith(".bias") or "norm" in n or "embedding_table" in n for n in decayed)
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_lr_schedule():
    assert lr_at(0, 1.0, 10, 100) == pytest.approx(0.1)
    assert lr_at(9, 1.0, 10, 100) == pytest.approx(1.0)
    assert lr_at(50, 1.0, 10, 100) == 1.0  # min_lr_ratio 1: constant
    assert lr_at(10, 1.0, 10, 100, 0.1) == pytest.approx(1.0)
    assert lr_at(55, 1.0, 10, 100, 0.1) == pytest.approx(0.55)  # half-way down the cosine
    assert lr_at(100, 1.0, 10, 100, 0.1) == pytest.approx(0.1)


def test_sample_cli_reproduces_the_training_preview(tmp_path, shapes_dir, capsys):
    from app.sample import main as sample_main
    from inference.images import to_uint8

    from training.trainer import train

    cfg = compose(tiny_overrides(tmp_path, shapes_dir))
    summary = train(cfg)
    ckpt = summary["checkpoint"]
    rec = sample_main([ckpt, "--classes", "0", "red_square", "--per-class", "2", "--seed", "3", "--out", str(tmp_path / "s.png")])
    assert rec["classes"] == [0, 4] and rec["steps"] == 4 and rec["cfg_scale"] == 3.0 and rec["weights"] == "ema"
    assert json.loads((tmp_path / "s.json").read_text()) == rec
    grid = np.asarray(Image.open(tmp_path / "s.png"))
    assert grid.shape == (2 * (96 + 2) + 2, 2 * (96 + 2) + 2, 3)
    # the same checkpoint, classes, seed and settings through the preview path give the same pixels
    from inference.pipeline import SampleSettings, generate, load_model

    model, ae, meta = load_model(ckpt)
    labels = torch.tensor([0, 4, 0, 4])
    s = SampleSettings(steps=4, cfg_scale=3.0, solver="euler", shift=1.0, seed=3)
    images = to_uint8(generate(model, ae, {"class_labels": labels}, {"class_labels": torch.full_like(labels, 12)}, (3, 16, 16), s))
    assert np.array_equal(grid[2:98:6, 2:98:6], images[0])  # top-left cell, upscaled 6x
    assert np.array_equal(grid[2:98:6, 100:196:6], images[1])
    with pytest.raises(SystemExit, match="unknown class 'purple_blob'"):
        sample_main([ckpt, "--classes", "purple_blob", "--out", str(tmp_path / "x.png")])
    with pytest.raises(SystemExit):  # refused before sampling: the grid is a PNG
        sample_main([ckpt, "--classes", "0", "--out", str(tmp_path / "grid")])
    assert "give a path ending in .png" in capsys.readouterr().err
    assert not (tmp_path / "grid").exists() and not (tmp_path / "grid.json").exists()
