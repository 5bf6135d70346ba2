"""FSDP2 on 2 gloo processes: trains, resumes, equals DDP, and its checkpoint loads in one process."""
import json
import os
import subprocess
import sys

import torch
from conftest import ROOT, tiny_overrides

from models.checkpoint import load_weights


def _torchrun(tmp_path, run, overrides):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(ROOT / "train_stage1.py"),
           *overrides]
    proc = subprocess.run(cmd, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    summary = tmp_path / run / "run" / "summary.json"
    # gloo may abort a rank at teardown (ENVIRONMENT.md): a finished run is one that wrote its summary
    assert summary.exists(), f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(summary.read_text())


def test_fsdp_trains_resumes_matches_ddp_and_loads_in_one_process(tmp_path, shapes_dir):
    base = {"train.global_batch_size": 16, "train.checkpoint_every": 2}
    ddp = _torchrun(tmp_path, "ddp", tiny_overrides(tmp_path / "ddp", shapes_dir, **base, **{"train.max_steps": 4}))
    _torchrun(tmp_path, "fsdp", tiny_overrides(tmp_path / "fsdp", shapes_dir, **base, **{"train.max_steps": 2, "train.parallel": "fsdp"}))
    fsdp = _torchrun(tmp_path, "fsdp", tiny_overrides(tmp_path / "fsdp", shapes_dir, **base, **{"train.max_steps": 4, "train.parallel": "fsdp"}))
    assert fsdp["step"] == 4 and fsdp["steps_this_run"] == 2 and fsdp["replica_divergence"] is None  # resumed at step 2
    for ema in (False, True):
        a, b = load_weights(ddp["checkpoint"], ema=ema), load_weights(fsdp["checkpoint"], ema=ema)
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)

    from inference.pipeline import SampleSettings, generate, latent_shape, load_model

    model, ae, meta = load_model(fsdp["checkpoint"])
    labels = torch.arange(4)
    images = generate(model, ae, {"class_labels": labels}, {"class_labels": torch.full_like(labels, 12)}, latent_shape(meta), SampleSettings(steps=3, cfg_scale=2.0))
    assert images.shape == (4, 3, 16, 16) and torch.isfinite(images).all()
