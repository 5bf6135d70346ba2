import torch.nn as nn

from models.checkpoint import latest_checkpoint, list_checkpoints, read_meta
from training.checkpoint import prune_checkpoints, save_checkpoint


def _save(root, step):
    m = nn.Linear(2, 2)
    return save_checkpoint(root, step, m, m, {"step": step}, "a: 1\n", {"stage": "stage1"})


def test_keep_last_and_keep_every(tmp_path):
    for step in range(100, 1100, 100):
        _save(tmp_path, step)
        prune_checkpoints(tmp_path, keep_last=2, keep_every=500)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_0000500", "step_0000900", "step_0001000"]
    assert latest_checkpoint(tmp_path).name == "step_0001000"


def test_latest_falls_back_to_a_scan_when_the_pointer_is_stale(tmp_path):
    _save(tmp_path, 1)
    _save(tmp_path, 2)
    (tmp_path / "latest").write_text("step_0000099\n")  # names a checkpoint that is gone
    assert latest_checkpoint(tmp_path).name == "step_0000002"
    (tmp_path / "step_0000002" / "meta.json").unlink()  # incomplete: ignored
    assert latest_checkpoint(tmp_path).name == "step_0000001"


def test_resaving_a_step_replaces_it_whole(tmp_path):
    _save(tmp_path, 5)
    path = _save(tmp_path, 5)
    assert read_meta(path)["step"] == 5 and not list(tmp_path.glob(".tmp-*"))


def test_checkpoints_of_the_previous_layout_still_load(tmp_path, shapes_dir):
    """Checkpoints written before precision left the architecture carry model_config.linear_backend: the
    sampler, stage.init_from and resume all take them."""
    import json

    from conftest import compose, tiny_overrides
    from inference.pipeline import Pipeline
    from training.trainer import train

    first = train(compose(tiny_overrides(tmp_path / "old", shapes_dir, **{"train.max_steps": 3})))
    for ckpt in (tmp_path / "old" / "run" / "checkpoints").glob("step_*"):
        meta = json.loads((ckpt / "meta.json").read_text())
        meta["model_config"]["linear_backend"] = "mxfp8_emulated"  # what the previous layout wrote
        (ckpt / "meta.json").write_text(json.dumps(meta))
    pipe = Pipeline.load(first["checkpoint"])
    assert pipe(pipe.conditioning.parse(["0", "1"]), pipe.defaults(steps=2)).shape == (2, 3, 16, 16)
    resumed = train(compose(tiny_overrides(tmp_path / "old", shapes_dir, **{"train.max_steps": 5})))
    assert resumed["step"] == 5 and resumed["steps_this_run"] == 2
    started = train(compose(tiny_overrides(tmp_path / "new", shapes_dir, **{"stage.init_from": first["checkpoint"]})))
    assert started["step"] == 6
