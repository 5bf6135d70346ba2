"""The app serves only what is under its folder, checks a model's size and a request's work before
spending anything, runs one request at a time with a Stop, and a broken checkpoint never stops it."""
import json
import os
import shutil

import pytest

from conftest import compose, tiny_overrides

gr = pytest.importorskip("gradio")

from app.gradio_app import Sampler, UserError, build_ui, find_checkpoints  # noqa: E402
from training.trainer import train  # noqa: E402


@pytest.fixture(scope="module")
def served_root(tmp_path_factory, shapes_dir):
    root = tmp_path_factory.mktemp("served")
    outside = tmp_path_factory.mktemp("outside")
    ckpt = train(compose(tiny_overrides(root / "run", shapes_dir, **{"train.max_steps": 2})))["checkpoint"]
    shutil.copytree(ckpt, outside / "elsewhere")
    os.symlink(outside / "elsewhere", root / "link")  # a symlink inside that leads outside
    return root, ckpt, outside / "elsewhere"


def test_only_checkpoints_inside_the_folder_are_served(served_root):
    root, ckpt, elsewhere = served_root
    sampler = Sampler(root)
    assert sampler.load(ckpt).meta["step"] == 2
    for path in (str(elsewhere), str(root / "run" / ".." / ".." / elsewhere.parent.name / "elsewhere"), str(root / "link")):
        with pytest.raises(UserError, match="outside the folder this app serves"):
            sampler.load(path)
    assert str(root / "link") not in find_checkpoints(root)


def test_uploaded_files_are_never_checkpoints(served_root, monkeypatch, tmp_path):
    root, ckpt, _ = served_root
    uploads = root / "gradio_uploads"
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(uploads))
    shutil.copytree(ckpt, uploads / "abc123" / "posted")  # what an upload route would leave on the server
    with pytest.raises(UserError, match="uploaded file"):
        Sampler(root).load(str(uploads / "abc123" / "posted"))


def test_a_large_model_is_refused_from_its_meta_before_any_allocation(served_root, tmp_path):
    root, ckpt, _ = served_root
    big = root / "big"
    shutil.copytree(ckpt, big)
    meta = json.loads((big / "meta.json").read_text())
    meta["model_config"].update(hidden_size=4096, depth=40, num_heads=32)  # ~13B parameters, never built
    (big / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match=r"model has 1[0-9]\.\d\dB parameters, more than this app serves \(3B"):
        Sampler(root).load(str(big))
    with pytest.raises(UserError, match="more than this app serves"):
        Sampler(root, max_params=1e3).load(ckpt)


def test_a_request_over_the_work_budget_is_refused(served_root):
    root, ckpt, _ = served_root
    sampler = Sampler(root, max_work=1e6)
    with pytest.raises(UserError, match="pixel-evaluations .* more than this app runs at once"):
        sampler.sample(ckpt, condition="red square", steps=1000, solver="rk4", batch=64)
    images, _, record = sampler.sample(ckpt, condition="red square", steps=2, batch=2)
    assert len(images) == 2  # a small one runs


def test_a_broken_first_checkpoint_leaves_the_app_serving(served_root, tmp_path):
    root, ckpt, _ = served_root
    broken = tmp_path / "broken"
    shutil.copytree(ckpt, broken)
    (broken / "config.yaml").write_text("train: [unclosed\n")
    sampler = Sampler()
    assert "config.yaml cannot be read" in sampler.info(str(broken))
    ui = build_ui([str(broken), ckpt], sampler)
    assert ui.config["components"]  # built
    fns = list(ui.fns.values()) if isinstance(ui.fns, dict) else ui.fns
    assert {f.api_name for f in fns} >= {"generate", "compare", "stop"}
    assert all(f.concurrency_limit in (1, "default") for f in fns if f.api_name in ("generate", "compare"))
    assert ui._queue.default_concurrency_limit == 1
