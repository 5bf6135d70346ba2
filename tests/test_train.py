"""The stage-1 trainer end to end on CPU: checkpoints, exact resume, learning."""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import compose, tiny_overrides
from models.checkpoint import latest_checkpoint, read_meta
from training.checkpoint import load_train_state
from training.trainer import train


def _weights(run_dir):
    ckpt = latest_checkpoint(run_dir / "checkpoints")
    return load_file(ckpt / "model.safetensors"), load_file(ckpt / "ema.safetensors"), ckpt


def test_checkpoint_describes_itself(tmp_path, shapes_dir):
    summary = train(compose(tiny_overrides(tmp_path, shapes_dir)))
    ckpt = tmp_path / "run" / "checkpoints" / "step_0000006"
    assert summary["checkpoint"] == str(ckpt) and summary["step"] == 6
    meta = read_meta(ckpt)
    assert meta["stage"] == "stage1" and meta["family"] == "ccdit" and meta["preset"] == "tiny"
    assert meta["model_config"]["num_classes"] == 12 and meta["has_ema"]
    assert meta["autoencoder"] == {"name": "none", "subfolder": None, "scaling_factor": 1.0, "shift_factor": 0.0}
    assert meta["conditioning"]["class_names"][0] == "red circle"
    state = load_train_state(ckpt)
    assert state["step"] == 6 and state["batches_done"] == 6
    assert (ckpt / "config.yaml").read_text().startswith("run_dir:")
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "step_0000006"
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [2, 4, 6] and all("loss_bin/9" in x for x in lines)


@pytest.mark.parametrize("accum,workers", [(1, 0), (2, 2)])
def test_resume_gives_the_same_weights(tmp_path, shapes_dir, accum, workers):
    extra = {"train.grad_accum": accum, "data.num_workers": workers, "train.checkpoint_every": 100}
    train(compose(tiny_overrides(tmp_path / "a", shapes_dir, **extra)))
    train(compose(tiny_overrides(tmp_path / "b", shapes_dir, **{**extra, "train.max_steps": 3})))
    summary = train(compose(tiny_overrides(tmp_path / "b", shapes_dir, **extra)))  # resume=auto
    assert summary["steps_this_run"] == 3
    (ma, ea, ca), (mb, eb, cb) = _weights(tmp_path / "a" / "run"), _weights(tmp_path / "b" / "run")
    for k in ma:
        torch.testing.assert_close(ma[k], mb[k], rtol=0, atol=1e-6)
        torch.testing.assert_close(ea[k], eb[k], rtol=0, atol=1e-6)
    sa, sb = load_train_state(ca), load_train_state(cb)
    assert sa["batches_done"] == sb["batches_done"] == 6 * accum
    for k, v in sa["optimizer"]["state"].items():
        torch.testing.assert_close(v["exp_avg_sq"], sb["optimizer"]["state"][k]["exp_avg_sq"], rtol=0, atol=1e-9)


def test_rerun_after_finish_trains_nothing(tmp_path, shapes_dir):
    train(compose(tiny_overrides(tmp_path, shapes_dir)))
    summary = train(compose(tiny_overrides(tmp_path, shapes_dir)))
    assert summary["steps_this_run"] == 0 and summary["step"] == 6


def test_short_demo_learns(tmp_path, shapes_dir):
    """The demo model, much shorter (400 steps of 32): the loss falls and EMA samples beat chance clearly."""
    overrides = tiny_overrides(
        tmp_path,
        shapes_dir,
        **{
            "model.preset": "demo",
            "train.global_batch_size": 32,
            "train.max_steps": 400,
            "train.warmup_steps": 40,
            "train.log_every": 25,
            "train.checkpoint_every": 0,
            "train.sample_every": 400,
            "train.ema_decay": 0.99,
            "train.sample.steps": 20,
            "data.eval_samples": 96,
        },
    )
    summary = train(compose(overrides))
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    first, last = lines[0]["loss"], np.mean([x["loss"] for x in lines[-3:]])
    assert last < 0.6 * first, (first, last)
    # chance is 1/12 for the class and 1/4 for the colour; the bounds ask for about twice chance and
    # leave room for other CPUs' rounding
    assert summary["eval_class_accuracy"] >= 0.15, summary
    assert summary["eval_colour_accuracy"] >= 0.45, summary


def test_activation_checkpointing_trains_to_the_same_weights(tmp_path, shapes_dir):
    train(compose(tiny_overrides(tmp_path / "a", shapes_dir)))
    train(compose(tiny_overrides(tmp_path / "b", shapes_dir, **{"train.activation_checkpointing": True})))
    (ma, _, _), (mb, _, _) = _weights(tmp_path / "a" / "run"), _weights(tmp_path / "b" / "run")
    for k in ma:
        torch.testing.assert_close(ma[k], mb[k], rtol=0, atol=1e-6)


@pytest.mark.slow
def test_compiled_training_matches_eager(tmp_path, shapes_dir):
    """train.compile=true (about a minute to compile on 2 cores): same run, same weights to fp tolerance."""
    train(compose(tiny_overrides(tmp_path / "eager", shapes_dir)))
    train(compose(tiny_overrides(tmp_path / "compiled", shapes_dir, **{"train.compile": True})))
    (ma, _, _), (mb, _, _) = _weights(tmp_path / "eager" / "run"), _weights(tmp_path / "compiled" / "run")
    for k in ma:
        torch.testing.assert_close(ma[k], mb[k], rtol=1e-4, atol=1e-5)


def test_compile_mode_reaches_torch_compile(tmp_path, shapes_dir, monkeypatch):
    """train.compile_mode is handed to torch.compile (here recorded, not compiled: the real
    compile is the slow test above)."""
    calls = []

    def record(module, **kwargs):
        calls.append(kwargs)
        return module

    monkeypatch.setattr(torch, "compile", record)
    train(compose(tiny_overrides(tmp_path, shapes_dir, **{"train.compile": True, "train.compile_mode": "max-autotune",
                                                            "train.max_steps": 1})))
    assert calls == [{"dynamic": None, "mode": "max-autotune"}]


def test_init_from_starts_a_fresh_run_from_another_checkpoint(tmp_path, shapes_dir):
    from training.config import ConfigError

    source = train(compose(tiny_overrides(tmp_path / "src", shapes_dir)))["checkpoint"]
    src_ema = load_file(f"{source}/ema.safetensors")
    train(compose(tiny_overrides(tmp_path / "ft", shapes_dir, **{"stage.init_from": source, "train.max_steps": 1})))
    (model, _, ckpt) = _weights(tmp_path / "ft" / "run")
    assert ckpt.name == "step_0000001"  # a fresh run: its own step count, not the source's
    moved = [k for k in src_ema if not torch.equal(model[k], src_ema[k])]
    assert moved and all((model[k] - src_ema[k]).abs().max() < 0.01 for k in src_ema)  # one small step away from the source
    with pytest.raises(ConfigError, match="holds a different model"):
        train(compose(tiny_overrides(tmp_path / "bad", shapes_dir, **{"stage.init_from": source, "model.qk_norm": False})))


def test_stop_after_pauses_without_changing_the_schedule(tmp_path, shapes_dir):
    full = train(compose(tiny_overrides(tmp_path / "a", shapes_dir)))
    paused = train(compose(tiny_overrides(tmp_path / "b", shapes_dir, **{"train.stop_after": 3})))
    assert paused["step"] == 3 and paused["checkpoint"].endswith("step_0000003")
    resumed = train(compose(tiny_overrides(tmp_path / "b", shapes_dir)))
    assert resumed["step"] == 6
    a, b = load_file(f"{full['checkpoint']}/ema.safetensors"), load_file(f"{resumed['checkpoint']}/ema.safetensors")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6)
