"""Wrong input stops before training with a message that says what to change."""
import json

import pytest
from hydra.errors import ConfigCompositionException

from conftest import ROOT, compose, tiny_overrides
from data.shards import ShardError
from training.config import ConfigError
from training.trainer import train

STAGE_CONFIGS = sorted(p.stem for p in (ROOT / "configs").glob("stage[0-9].yaml"))


def test_stage_configs_compose():
    assert "stage1" in STAGE_CONFIGS
    for name in STAGE_CONFIGS:
        cfg = compose(config_name=name)
        assert cfg.stage.name == name
        cfg = compose(["experiment=demo"], config_name=name)
        assert cfg.model.preset == "demo"


def test_unknown_key_is_an_error():
    with pytest.raises(ConfigCompositionException, match="train.lerning_rate"):
        compose(["train.lerning_rate=1"])


def test_resolution_not_divisible_by_patch(tmp_path, shapes_dir):
    cfg = compose(tiny_overrides(tmp_path, shapes_dir, **{"data.image_size": 31}))
    with pytest.raises(ValueError, match="input_size=31 is not divisible by patch_size=2"):
        train(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_hidden_not_divisible_by_heads(tmp_path, shapes_dir):
    from models.presets import PRESETS

    PRESETS["ccdit"]["bad"] = dict(PRESETS["ccdit"]["tiny"], num_heads=3)
    try:
        cfg = compose(tiny_overrides(tmp_path, shapes_dir, **{"model.preset": "bad"}))
        with pytest.raises(ValueError, match="hidden_size=32 is not divisible by num_heads=3"):
            train(cfg)
    finally:
        del PRESETS["ccdit"]["bad"]


def test_global_batch_not_divisible_by_world_size(tmp_path, shapes_dir, monkeypatch):
    cfg = compose(tiny_overrides(tmp_path, shapes_dir, **{"train.global_batch_size": 15, "train.grad_accum": 2}))
    with pytest.raises(ConfigError, match="global_batch_size=15 is not divisible by world_size \\(1\\) x train.grad_accum \\(2\\)"):
        train(cfg)


def test_te_needs_a_micro_batch_divisible_by_8(tmp_path, shapes_dir):
    """Checked before TE is imported, so it stops the same way with or without TE installed."""
    cfg = compose(tiny_overrides(tmp_path, shapes_dir, precision="te", **{"train.global_batch_size": 12}))
    with pytest.raises(ConfigError, match="precision.linear=te .* multiple of 8, but it is 12 .* multiple of 8"):
        train(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_manifest_disagreeing_with_config(tmp_path, shapes_dir):
    bad = tmp_path / "bad_shards"
    bad.mkdir()
    manifest = json.loads((shapes_dir / "manifest.json").read_text())
    for s in manifest["shards"]:
        (bad / s["name"]).symlink_to(shapes_dir / s["name"])
    manifest["num_classes"] = 10
    (bad / "manifest.json").write_text(json.dumps(manifest))
    cfg = compose(tiny_overrides(tmp_path, shapes_dir, **{"data.path": str(bad), "data.generate": False}))
    with pytest.raises(ShardError, match="num_classes: config expects 12, shards have 10"):
        train(cfg)


def test_missing_data_directory(tmp_path, shapes_dir):
    cfg = compose(tiny_overrides(tmp_path, shapes_dir, **{"data.path": str(tmp_path / "nope"), "data.generate": False}))
    with pytest.raises(ShardError, match="does not exist. Point data.path at a folder of shards"):
        train(cfg)


def test_resume_none_refuses_an_existing_run(tmp_path, shapes_dir):
    train(compose(tiny_overrides(tmp_path, shapes_dir, **{"train.max_steps": 2})))
    with pytest.raises(ConfigError, match="already has checkpoints and resume=none"):
        train(compose(tiny_overrides(tmp_path, shapes_dir, **{"train.max_steps": 2, "resume": "none"})))


def test_resume_with_changed_model_is_refused(tmp_path, shapes_dir):
    train(compose(tiny_overrides(tmp_path, shapes_dir, **{"train.max_steps": 2})))
    with pytest.raises(ConfigError, match="the model config changed"):
        train(compose(tiny_overrides(tmp_path, shapes_dir, **{"train.max_steps": 4, "model.qk_norm": False})))


def test_wandb_without_the_package_says_how_to_install_it(tmp_path, shapes_dir):
    import importlib.util

    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    with pytest.raises(RuntimeError, match=r"needs wandb: pip install -e '.\[wandb\]'"):
        train(compose(tiny_overrides(tmp_path, shapes_dir, **{"train.wandb.mode": "offline"})))


def test_bf16_autocast_on_cpu_only_when_asked(monkeypatch):
    import torch

    from training.precision import autocast_enabled

    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    cfg = compose().precision  # the default: torch linears, autocast bf16, autocast_cpu false
    assert (autocast_enabled(cfg, cpu), autocast_enabled(cfg, gpu)) == (False, True)
    on_cpu = compose(["precision.autocast_cpu=true"]).precision
    assert autocast_enabled(on_cpu, cpu)
    assert not autocast_enabled(compose(["precision.autocast_cpu=true", "precision.autocast=none"]).precision, cpu)
    with pytest.raises(ValueError, match="expected 'bf16' or 'none'"):
        autocast_enabled(compose(["precision.autocast=fp16"]).precision, gpu)
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_bf16": False, "amx_bf16": False, "avx512_f": True})
    from training.logger import log

    warned = []
    monkeypatch.setattr(log, "warning", lambda msg, *a: warned.append(msg % a))
    assert autocast_enabled(on_cpu, cpu)  # asked for explicitly: on, with a warning that says how to turn it off
    assert len(warned) == 1 and "precision.autocast_cpu=false" in warned[0]


def test_a_preset_defines_its_architecture_and_explicit_settings_win(caplog):
    """model.preset=PixArt-alpha-XL/2 has no QK-norm, whatever the model group's defaults; model.qk_norm set
    on the command line wins, and says so; check_diffusers_export refuses what diffusers cannot hold."""
    import logging

    from inference.conditioning import TextConditioning
    from models.autoencoder import PixelSpace
    from training.setup import build_model_config

    text = TextConditioning("an-encoder", 16, 64)
    cfg = compose(["model.preset=PixArt-alpha-XL/2", "data.image_size=16"], "stage2")
    assert build_model_config(cfg, PixelSpace(), text).qk_norm is False
    assert build_model_config(compose(["data.image_size=16"], "stage2"), PixelSpace(), text).qk_norm is True  # XL/2's default
    with caplog.at_level(logging.INFO, logger="flowdit"):
        on = build_model_config(compose(["model.preset=PixArt-alpha-XL/2", "model.qk_norm=true", "data.image_size=16"], "stage2"),
                                PixelSpace(), text)
    assert on.qk_norm is True and "model.qk_norm=True overrides the PixArt-alpha-XL/2 preset's False" in caplog.text
    with pytest.raises(ConfigError, match="check_diffusers_export: .*qk_norm=True"):
        build_model_config(compose(["model.qk_norm=true", "model.check_diffusers_export=true", "data.image_size=16"], "stage2"),
                           PixelSpace(), text)
    build_model_config(compose(["model.preset=PixArt-alpha-XL/2", "model.check_diffusers_export=true", "data.image_size=16"], "stage2"),
                       PixelSpace(), text)
