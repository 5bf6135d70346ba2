"""Pre-emption signals, non-finite guards and start-up checks."""
import os
import signal
import stat
import time

import pytest
import torch

from conftest import compose, tiny_overrides
from tests.reliability.conftest import start, train_cmd, wait_for_line
from models.checkpoint import latest_checkpoint, load_weights
from training.checkpoint import load_train_state
from training.guards import PREEMPTED_EXIT_CODE
from training.config import ConfigError
from training.trainer import train


def test_sigterm_checkpoints_the_current_step_and_exits_75(tmp_path, shapes_dir):
    cmd = train_cmd(tmp_path, shapes_dir, **{"train.max_steps": 100000, "train.log_every": 5, "train.checkpoint_every": 0})
    proc = start(cmd, tmp_path)
    wait_for_line(proc, "step 10/100000")
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == PREEMPTED_EXIT_CODE, out
    ckpt = latest_checkpoint(tmp_path / "run" / "checkpoints")
    step = load_train_state(ckpt)["step"]
    assert ckpt.name == f"step_{step:07d}" and step >= 10
    assert f"checkpoint of step {step} saved; exiting with code 75" in out
    # the same command continues from that step
    summary = train(compose(tiny_overrides(tmp_path, shapes_dir, **{"train.max_steps": step + 4, "train.checkpoint_every": 0})))
    assert summary["step"] == step + 4 and summary["steps_this_run"] == 4


def test_a_second_signal_exits_at_once(tmp_path, shapes_dir):
    # a save that stalls for 30 s: the first SIGTERM starts it, the second must not wait for it
    cmd = train_cmd(tmp_path, shapes_dir, **{"train.max_steps": 100000, "train.log_every": 5, "train.checkpoint_every": 0})
    proc = start(cmd, tmp_path, save_pause=30)
    wait_for_line(proc, "step 5/100000")
    proc.send_signal(signal.SIGTERM)
    time.sleep(2.0)  # now inside the stalled save
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=20)
    assert proc.returncode == 128 + signal.SIGTERM
    assert latest_checkpoint(tmp_path / "run" / "checkpoints") is None  # nothing half-written under a real name


def test_loss_spikes_are_flagged():
    from training.guards import SpikeDetector

    d = SpikeDetector(factor=3.0)
    assert [d.update(x) for x in [1.0, 1.1, 0.9, 1.0]] == [False] * 4
    assert d.update(5.0) is True
    assert d.update(float("nan")) is False


def test_too_little_disk_space_fails_before_training(tmp_path, shapes_dir, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(ConfigError, match="free but a checkpoint of this model needs about"):
        train(compose(tiny_overrides(tmp_path, shapes_dir)))
    assert not (tmp_path / "run" / "checkpoints").exists()


def _nan_loss_at(monkeypatch, calls_to_poison):
    import flow.objectives as objectives_mod

    real = objectives_mod.flow_loss
    count = {"n": 0}

    def poisoned(*args):
        out = real(*args)
        count["n"] += 1
        return out * float("nan") if calls_to_poison(count["n"]) else out

    monkeypatch.setattr(objectives_mod, "flow_loss", poisoned)  # what the training step's objective calls


def test_one_nan_step_is_skipped_and_training_goes_on(tmp_path, shapes_dir, monkeypatch):
    _nan_loss_at(monkeypatch, lambda n: n == 3)
    summary = train(compose(tiny_overrides(tmp_path, shapes_dir)))
    assert summary["step"] == 6 and summary["skipped_steps"] == 1
    weights = load_weights(latest_checkpoint(tmp_path / "run" / "checkpoints"))
    assert all(torch.isfinite(v).all() for v in weights.values())


def test_nan_every_step_stops_with_the_last_good_checkpoint_intact(tmp_path, shapes_dir, monkeypatch):
    _nan_loss_at(monkeypatch, lambda n: n > 3)  # steps 1-3 fine, checkpoint at 3, then NaN forever
    cfg = compose(tiny_overrides(tmp_path, shapes_dir, **{"train.max_steps": 50, "train.max_nonfinite_steps": 4}))
    with pytest.raises(FloatingPointError, match=r"4 consecutive steps .* last good checkpoint is .*step_0000003"):
        train(cfg)
    ckpt = latest_checkpoint(tmp_path / "run" / "checkpoints")
    assert ckpt.name == "step_0000003"
    assert all(torch.isfinite(v).all() for v in load_weights(ckpt).values())


def test_read_only_run_dir_fails_before_training(tmp_path, shapes_dir):
    if os.geteuid() == 0:
        # root ignores permission bits: make the run dir's parent a file instead, which nobody can write into
        ro = tmp_path / "file"
        ro.write_text("x")
        run_dir = ro / "run"
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(stat.S_IRUSR | stat.S_IXUSR)
        run_dir = ro / "run"
    cfg = compose(tiny_overrides(tmp_path, shapes_dir, run_dir=str(run_dir)))
    with pytest.raises(ConfigError, match="(is not writable|cannot be created).* set run_dir to a folder you can write to"):
        train(cfg)


def test_truncated_checkpoint_is_skipped_and_the_older_one_resumed(tmp_path, shapes_dir, capsys):
    train(compose(tiny_overrides(tmp_path, shapes_dir)))
    weights = latest_checkpoint(tmp_path / "run" / "checkpoints") / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    capsys.readouterr()
    summary = train(compose(tiny_overrides(tmp_path, shapes_dir, **{"train.max_steps": 8})))
    out = capsys.readouterr().out
    assert "step_0000006: model.safetensors cannot be read" in out
    assert "step_0000003 at step 3" in out and summary["step"] == 8 and summary["steps_this_run"] == 5
    # the damaged folder is kept aside, not overwritten
    assert any(p.name.startswith("replaced-step_0000006") for p in (tmp_path / "run" / "checkpoints").iterdir())


def test_changed_lr_and_steps_are_allowed_on_resume_and_logged(tmp_path, shapes_dir, capsys):
    train(compose(tiny_overrides(tmp_path, shapes_dir, **{"train.max_steps": 4})))
    capsys.readouterr()
    summary = train(compose(tiny_overrides(tmp_path, shapes_dir, **{"train.max_steps": 6, "train.lr": 0.002})))
    assert summary["step"] == 6 and summary["steps_this_run"] == 2
    text = capsys.readouterr().out
    assert "config change since the last run: train.lr: 0.001 -> 0.002" in text
    assert "config change since the last run: train.max_steps: 4 -> 6" in text
    assert "resumed from" in text and "step_0000004 at step 4" in text
