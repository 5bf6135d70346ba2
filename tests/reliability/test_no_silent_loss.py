"""Nothing lost silently: damaged checkpoints are never trained over, one trainer per run dir, bad samples
are skipped and counted (and resume the same), a failed save leaves the older checkpoints, a signal at
start-up still exits 75, and messages never suggest running a file's code."""
import json
import os
import pickle
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import ROOT, compose, tiny_overrides
from data.shards import ShardStream, ShardWriter, read_manifest
from training.guards import PREEMPTED_EXIT_CODE
from training.trainer import ConfigError, train

try:
    from models.checkpoint import CheckpointError, read_meta
except ImportError:  # the layout before checkpoint reading moved below inference
    from training.checkpoint import CheckpointError, read_meta


def _files(run_dir):
    """Every checkpoint file and its bytes."""
    return {p.relative_to(run_dir): p.read_bytes() for p in sorted((run_dir / "checkpoints").rglob("*")) if p.is_file()}


# ---------------------------------------------------------------- 1. checkpoints a resume cannot use
def test_checkpoints_missing_meta_are_refused_never_trained_over(tmp_path, shapes_dir):
    run = tmp_path / "run"
    train(compose(tiny_overrides(tmp_path, shapes_dir)))  # checkpoints at steps 3 and 6
    for name in ("step_0000003", "step_0000006"):
        (run / "checkpoints" / name / "meta.json").unlink()
    before = _files(run)
    with pytest.raises(ConfigError, match=r"(?s)none can be resumed from.*step_0000006: meta.json missing.*Nothing was changed"):
        train(compose(tiny_overrides(tmp_path, shapes_dir)))
    assert _files(run) == before  # not one byte of the trained weights deleted or rewritten


def test_a_damaged_newest_checkpoint_is_named_skipped_and_kept(tmp_path, shapes_dir, capsys):
    run = tmp_path / "run"
    train(compose(tiny_overrides(tmp_path, shapes_dir)))
    newest = run / "checkpoints" / "step_0000006"
    (newest / "meta.json").write_text('{"format": "flowdit-checkpoint-v1", "st')  # truncated
    capsys.readouterr()
    summary = train(compose(tiny_overrides(tmp_path, shapes_dir)))
    out = capsys.readouterr().out
    assert "skipping" in out and "step_0000006: " in out and "meta.json is not valid JSON" in out
    assert summary["steps_this_run"] == 3  # resumed from step 3
    kept = list((run / "checkpoints").glob("replaced-step_0000006-*"))
    assert len(kept) == 1 and (kept[0] / "meta.json").read_text().endswith('"st')  # the damaged folder kept aside, as it was
    assert read_meta(newest)["step"] == 6


def test_a_truncated_meta_json_gets_a_message_naming_it(tmp_path, shapes_dir):
    summary = train(compose(tiny_overrides(tmp_path, shapes_dir)))
    meta = os.path.join(summary["checkpoint"], "meta.json")
    with open(meta, "r+") as f:
        f.truncate(20)
    with pytest.raises(CheckpointError, match="meta.json is not valid JSON"):
        read_meta(summary["checkpoint"])


# ---------------------------------------------------------------- 2. bad samples
def _data_with_bad_samples(src, out, bad_every=25):
    """A copy of the shapes shards where every bad_every-th sample is broken: a latent of the wrong shape,
    or a label outside the classes (99, -1)."""
    manifest = read_manifest(src)
    fields = {k: v for k, v in manifest.items() if k not in ("format", "latent_shape", "num_samples", "shards")}
    kinds = ["shape", "label99", "label-1"]
    stream = ShardStream(src, 1, shuffle_buffer=0)
    with ShardWriter(out, 500, manifest_fields=fields) as w:
        for i, batch in zip(range(2000), stream):
            latent, meta = batch["latent"][0].numpy(), dict(batch["meta"][0])
            if i % bad_every == 7:
                kind = kinds[(i // bad_every) % 3]
                if kind == "shape":
                    latent = latent[:, :8]
                else:
                    meta["label"] = 99 if kind == "label99" else -1
            w.write(batch["keys"][0], latent, meta)
    return out


def test_bad_samples_are_skipped_counted_and_resume_exactly(tmp_path, shapes_dir):
    data = _data_with_bad_samples(shapes_dir, tmp_path / "data")
    extra = {"data.path": str(data), "data.max_bad_fraction": 0.1, "train.max_steps": 8, "train.checkpoint_every": 4,
             "data.shuffle_buffer": 0}
    full = train(compose(tiny_overrides(tmp_path / "a", shapes_dir, **extra)))
    assert full["step"] == 8
    metrics = [json.loads(x) for x in (tmp_path / "a" / "run" / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert metrics[-1]["bad_samples"] >= 4  # 8 steps x 16 samples read past at least 5 bad ones
    train(compose(tiny_overrides(tmp_path / "b", shapes_dir, **{**extra, "train.max_steps": 8, "train.stop_after": 4})))
    resumed = train(compose(tiny_overrides(tmp_path / "b", shapes_dir, **extra)))
    assert resumed["steps_this_run"] == 4
    from safetensors.torch import load_file

    a, b = (load_file(os.path.join(s["checkpoint"], "model.safetensors")) for s in (full, resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)  # the same samples after the resume as without it


def test_sample_check_names_what_is_wrong():
    from data.shards import SampleCheck

    check = SampleCheck(latent_shape=(3, 16, 16), num_classes=12)
    good = {"latent": np.zeros((3, 16, 16), np.float16), "meta": {"label": 3}}
    assert check.problem(good) is None
    assert "shape (3, 8, 16)" in check.problem({**good, "latent": np.zeros((3, 8, 16), np.float16)})
    assert "label 12" in check.problem({**good, "meta": {"label": 12}})
    assert "label None" in check.problem({**good, "meta": {}})
    nan = np.zeros((3, 16, 16), np.float16)
    nan[0, 0, 0] = np.nan
    assert "not finite" in check.problem({**good, "latent": nan})
    bucketed = SampleCheck(channels=3, downsample=1)
    assert bucketed.problem({"latent": np.zeros((3, 24, 48), np.float16), "meta": {"bucket": [24, 48]}}) is None
    assert "not (3, 48, 24)" in bucketed.problem({"latent": np.zeros((3, 24, 48), np.float16), "meta": {"bucket": [48, 24]}})


# ---------------------------------------------------------------- 3. one trainer per run dir
def test_a_second_trainer_on_the_run_dir_is_refused_naming_the_first(tmp_path, shapes_dir):
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from training.lock import RunLock; "
                               f"RunLock({str(run)!r}).acquire(); print('held', flush=True); time.sleep(60)"],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ConfigError, match=rf"in use by another trainer \(host .*, pid {holder.pid}, started"):
            train(compose(tiny_overrides(tmp_path, shapes_dir)))
        assert not (run / "checkpoints").exists()
    finally:
        holder.kill()
        holder.wait()
    # the holder died without releasing: its lock is taken over, with a note
    summary = train(compose(tiny_overrides(tmp_path, shapes_dir)))
    assert summary["step"] == 6


# ---------------------------------------------------------------- 5. a failed save, bad run dirs
def test_a_failed_save_leaves_no_trace_and_the_older_checkpoints(tmp_path, shapes_dir, monkeypatch):
    import models.checkpoint as ckpt_module

    real, calls = ckpt_module.save_file, {"n": 0}

    def full_disk(tensors, path, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 2:  # the second save's first file: the first save (model + EMA) went through
            raise RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: \"No space left on device\" })")
        return real(tensors, path, *args, **kwargs)

    monkeypatch.setattr(ckpt_module, "save_file", full_disk)
    with pytest.raises(CheckpointError, match=r"saving the checkpoint of step 6 .* failed .* the newest checkpoint is still step_0000003"):
        train(compose(tiny_overrides(tmp_path, shapes_dir)))
    checkpoints = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step_0000003"]  # no temporary folder left
    monkeypatch.setattr(ckpt_module, "save_file", real)
    assert train(compose(tiny_overrides(tmp_path, shapes_dir)))["steps_this_run"] == 3  # the next start resumes


def test_a_run_dir_under_a_file_gets_the_projects_message(tmp_path, shapes_dir):
    (tmp_path / "file").write_text("x")
    out = subprocess.run([sys.executable, str(ROOT / "train_stage1.py"),
                          *tiny_overrides(tmp_path, shapes_dir, run_dir=str(tmp_path / "file" / "run"))],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 1 and "cannot be created" in out.stderr + out.stdout and "set run_dir to a folder" in out.stderr + out.stdout


# ---------------------------------------------------------------- 6. a signal while starting
def test_sigterm_in_the_first_second_exits_75(tmp_path, shapes_dir):
    proc = subprocess.Popen([sys.executable, str(ROOT / "train_stage1.py"), *tiny_overrides(tmp_path, shapes_dir)],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(1.0)  # still importing torch and Hydra
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == PREEMPTED_EXIT_CODE, out
    assert not (tmp_path / "run" / "checkpoints").exists() or not list((tmp_path / "run" / "checkpoints").glob("step_*"))


# ---------------------------------------------------------------- 8. messages
def test_a_pickled_train_state_is_refused_without_advice_to_run_it(tmp_path, shapes_dir):
    from training.checkpoint import load_train_state

    summary = train(compose(tiny_overrides(tmp_path, shapes_dir)))
    state = os.path.join(summary["checkpoint"], "train_state.pt")

    class Payload:
        def __reduce__(self):
            return (print, ("ran",))

    with open(state, "wb") as f:
        pickle.dump({"step": Payload()}, f)
    with pytest.raises(CheckpointError) as err:
        load_train_state(summary["checkpoint"])
    assert "weights_only" not in str(err.value) and "cannot be loaded safely" in str(err.value)


def test_non_finite_weights_are_refused_by_the_sampler(tmp_path, shapes_dir):
    from safetensors.torch import load_file, save_file

    from inference.pipeline import Pipeline

    summary = train(compose(tiny_overrides(tmp_path, shapes_dir)))
    path = os.path.join(summary["checkpoint"], "ema.safetensors")
    weights = load_file(path)
    weights["final_layer.linear.weight"][0, 0] = float("nan")
    save_file(weights, path)
    with pytest.raises(CheckpointError, match=r"ema.safetensors holds NaN or infinite values in 1 tensors \(final_layer.linear.weight"):
        Pipeline.load(summary["checkpoint"])
