"""kill -9 at random points, including inside a checkpoint write, then resume: same final weights."""
import random
import signal
import time

import torch

from conftest import compose, tiny_overrides
from tests.reliability.conftest import start, train_cmd, wait_for_line
from models.checkpoint import latest_checkpoint, list_checkpoints, load_weights
from training.checkpoint import load_train_state
from training.trainer import train

STEPS = {"train.max_steps": 12, "train.checkpoint_every": 2}


def _final(run_dir):
    ckpt = latest_checkpoint(run_dir / "checkpoints")
    assert ckpt.name == "step_0000012"
    return load_weights(ckpt), load_weights(ckpt, ema=True)


def _assert_readable(run_dir):
    ckpt = latest_checkpoint(run_dir / "checkpoints")
    if ckpt is not None:  # whatever `latest` names must load
        load_weights(ckpt), load_weights(ckpt, ema=True), load_train_state(ckpt)


def test_kill9_anywhere_then_resume_matches_an_uninterrupted_run(tmp_path, shapes_dir):
    train(compose(tiny_overrides(tmp_path / "ref", shapes_dir, **STEPS)))
    ref_model, ref_ema = _final(tmp_path / "ref" / "run")

    rng = random.Random(1234)
    trials = [("random", 0), ("random", 0), ("random", 0), ("inside a save", 3)]
    for i, (kind, save_pause) in enumerate(trials):
        base = tmp_path / f"trial{i}"
        run_dir = base / "run"
        proc = start(train_cmd(base, shapes_dir, **STEPS), base.parent, save_pause)
        if kind == "random":
            wait_for_line(proc, "step 2/12")
            time.sleep(rng.uniform(0.0, 1.0))
        else:
            wait_for_line(proc, "step 2/12")  # the save of step 2 starts right after this line
            time.sleep(1.0)
            assert list(run_dir.joinpath("checkpoints").glob(".tmp-step_0000002-*")), "expected to be inside the save"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        _assert_readable(run_dir)
        if kind != "random":
            assert not (run_dir / "checkpoints" / "step_0000002").exists()  # the half-written save never got its name
        summary = train(compose(tiny_overrides(base, shapes_dir, **STEPS)))  # resume=auto
        assert summary["step"] == 12
        assert not list(run_dir.joinpath("checkpoints").glob(".tmp-*"))
        model, ema = _final(run_dir)
        for k in ref_model:
            torch.testing.assert_close(model[k], ref_model[k], rtol=0, atol=1e-6, msg=f"trial {i} ({kind}): {k}")
            torch.testing.assert_close(ema[k], ref_ema[k], rtol=0, atol=1e-6, msg=f"trial {i} ({kind}): EMA {k}")
        assert [p.name for p in list_checkpoints(run_dir / "checkpoints")][-1] == "step_0000012"
