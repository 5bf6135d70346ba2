"""What users of diffusers / Hydra / wandb bring with them: trackers, sweeps, typed configs, the GPU for
sampling, help that shows each entry point's own examples and defaults, an install that claims no names."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from hydra.errors import ConfigCompositionException

from conftest import ROOT, compose, tiny_overrides
from training.trainer import train


# ---------------------------------------------------------------- trackers
def test_wandb_offline_gets_numbers_grids_and_the_final_evaluation(tmp_path, shapes_dir, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    summary = train(compose(tiny_overrides(tmp_path, shapes_dir, **{"train.report_to": "wandb", "train.sample_every": 3})))
    assert summary["step"] == 6 and "eval_class_accuracy" in summary  # the final evaluation ran before wandb closed
    assert (tmp_path / "run" / "summary.json").is_file()
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))  # the run's log, for `wandb sync`
    assert len(list(runs[0].rglob("media/images/**/*.png"))) == 2, "the evaluation grids (steps 3 and 6) reach wandb as images"


def test_wandb_without_an_account_says_how_to_log_offline(tmp_path, shapes_dir):
    pytest.importorskip("wandb")
    import os

    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_API_KEY", "WANDB_MODE")}
    env.update(HOME=str(tmp_path), WANDB_SILENT="true")  # no ~/.netrc: no stored key; a process of its own, as a user's run
    out = subprocess.run([sys.executable, str(ROOT / "train_stage1.py"), *tiny_overrides(tmp_path, shapes_dir),
                          "train.report_to=wandb"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 1, out.stdout[-2000:] + out.stderr[-2000:]
    assert "train.report_to=wandb" in out.stderr and "add train.wandb.mode=offline (or set WANDB_MODE=offline)" in out.stderr, \
        out.stderr[-2000:]
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_tensorboard_gets_numbers_and_grids(tmp_path, shapes_dir):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(compose(tiny_overrides(tmp_path, shapes_dir, **{"train.report_to": "tensorboard", "train.sample_every": 3})))
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    assert {"loss", "lr", "eval/class_accuracy"} <= set(tags["scalars"])
    assert [e.step for e in events.Scalars("loss")] == [2, 4, 6]
    assert "eval/grid" in tags["images"] and [e.step for e in events.Images("eval/grid")] == [3, 6]


def test_an_unknown_tracker_is_refused(tmp_path, shapes_dir):
    from training.config import ConfigError

    with pytest.raises(ConfigError, match="train.report_to='mlflow'"):
        train(compose(tiny_overrides(tmp_path, shapes_dir, **{"train.report_to": "mlflow"})))


# ---------------------------------------------------------------- sweeps
def test_a_sweep_gives_every_job_its_own_run(tmp_path, shapes_dir):
    out = subprocess.run([sys.executable, str(ROOT / "train_stage1.py"), "-m",
                          *tiny_overrides(tmp_path, shapes_dir, **{"train.max_steps": 3, "train.checkpoint_every": 0}),
                          "train.lr=1e-3,5e-4"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    for job, lr in (("job0", 0.001), ("job1", 0.0005)):
        summary = json.loads((tmp_path / "run" / job / "summary.json").read_text())
        assert summary["steps_this_run"] == 3, job  # each trained, none resumed the other
        assert f"lr: {lr}" in (tmp_path / "run" / job / "config.yaml").read_text()


# ---------------------------------------------------------------- typed configs
def test_a_value_of_the_wrong_type_is_refused_when_composing_naming_the_key():
    with pytest.raises(ConfigCompositionException) as err:
        compose(["train.lr=abc"])
    assert "full_key: train.lr" in str(err.value.__cause__) and "Float" in str(err.value.__cause__)
    with pytest.raises(ConfigCompositionException) as err:
        compose(["train.max_steps=many"])
    assert "full_key: train.max_steps" in str(err.value.__cause__)
    with pytest.raises(ConfigCompositionException):
        compose(["precision.autocast_cpu=sometimes"])


# ---------------------------------------------------------------- sampling devices
def test_sampling_uses_the_gpu_when_there_is_one(monkeypatch):
    from inference import pipeline

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pipeline.pick_device("auto") == torch.device("cuda") and pipeline.pick_device(None) == torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pipeline.pick_device("auto") == torch.device("cpu")
    assert pipeline.pick_device("cuda:1") == torch.device("cuda:1")


def test_the_cli_samples_other_sizes_in_batches_and_bf16(tmp_path, text_shapes_dir):
    from PIL import Image

    from app.sample import main as sample_main
    from conftest import stage2_overrides

    ckpt = train(compose(stage2_overrides(tmp_path, text_shapes_dir), "stage2"))["checkpoint"]
    common = [ckpt, "--prompt", "a small red circle on a black background", "--per-class", "4", "--steps", "3", "--height", "16",
              "--width", "32"]
    whole = sample_main([*common, "--out", str(tmp_path / "a.png")])
    batched = sample_main([*common, "--batch", "3", "--out", str(tmp_path / "b.png")])
    assert (whole["height"], whole["width"], whole["device"]) == (16, 32, "cpu")
    a, b = (np.asarray(Image.open(tmp_path / f"{n}.png"), dtype=float) for n in ("a", "b"))
    assert a.shape == b.shape and np.abs(a - b).max() <= 1  # the batch size does not change the images
    sample_main([*common, "--dtype", "bf16", "--out", str(tmp_path / "c.png")])
    c = np.asarray(Image.open(tmp_path / "c.png"), dtype=float)
    assert np.abs(a - c).mean() < 8  # bf16 weights: the same images but for rounding
    with pytest.raises(SystemExit, match="resolution 15x32 is not possible"):
        sample_main([*common[:-4], "--height", "15", "--width", "32", "--out", str(tmp_path / "d.png")])


# ---------------------------------------------------------------- help and packaging
@pytest.mark.parametrize("stage", [2, 3, 4, 5])
def test_each_stage_help_shows_its_own_examples(stage):
    out = subprocess.run([sys.executable, str(ROOT / f"train_stage{stage}.py"), "--help"], capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    assert out.returncode == 0 and f"train_stage{stage}.py experiment=" in out.stdout and "train_stage1.py" not in out.stdout


@pytest.mark.parametrize("script", ["app/sample.py", "app/gradio_app.py", "scripts/evaluate_checkpoint.py", "reparameterize.py",
                                    "scripts/run_demo.py", "scripts/export_diffusers.py"])
def test_help_shows_defaults_and_choices(script):
    out = subprocess.run([sys.executable, str(ROOT / script), "--help"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0 and "python " in out.stdout  # its own examples
    assert "(default:" in out.stdout or script == "scripts/export_diffusers.py"
    if script in ("app/sample.py", "scripts/evaluate_checkpoint.py"):
        assert "{euler,midpoint,rk4,dopri5,heun3,bosh3,dpm++,ddim,lcm}" in out.stdout  # the solvers are choices


def test_the_install_claims_no_top_level_names(tmp_path):
    """The code runs in place from the checkout; installing the project brings its dependencies and
    nothing named models, data, training, ... into site-packages."""
    import zipfile

    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path),
                          str(ROOT)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    [wheel] = tmp_path.glob("*.whl")
    tops = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
    assert all(t.endswith(".dist-info") for t in tops), tops
