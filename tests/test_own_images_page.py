"""docs/own_images.md, run as written: its shell blocks in order on a generated folder of class folders
with captions. Only the page's variables are set here (to the folder, a few steps), plus a smaller
batch and fewer sampling steps on the training lines, so it runs in about a minute."""
import dataclasses
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT

PAGE = ROOT / "docs" / "own_images.md"
CLASSES = {"circle": "red", "square": "blue", "triangle": "yellow"}
PER_CLASS = 16
SHRINK = " train.global_batch_size=16 train.sample.steps=4"  # appended to the training commands only


def page_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)```", PAGE.read_text(), flags=re.S)


def make_images(root):
    """32-px renders of three shapes in class folders, each with a caption in x.txt."""
    from data.shapes import render, random_spec

    rng = np.random.default_rng(0)
    for shape, colour in CLASSES.items():
        (root / shape).mkdir(parents=True)
        for i in range(PER_CLASS):
            spec = random_spec(rng, 32, 32)
            while spec.shape != shape:
                spec = random_spec(rng, 32, 32)
            spec = dataclasses.replace(spec, colour=colour)
            Image.fromarray(render(spec, 32, 32)).save(root / shape / f"{i:03d}.png")
            (root / shape / f"{i:03d}.txt").write_text(f"a {spec.size} {colour} {shape} on a {spec.background} background")


def test_the_page_runs_end_to_end(tmp_path):
    blocks = page_blocks()
    variables, steps = blocks[0], blocks[1:]
    assert re.findall(r"^(\w+)=", variables, flags=re.M) == ["IMAGES", "DATA", "RUNS", "SIZE", "STEPS1", "STEPS2", "PROMPT"]
    assert len(steps) == 6
    make_images(tmp_path / "images")
    env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}", "PYTHONPATH": str(ROOT),
           "IMAGES": str(tmp_path / "images"), "DATA": str(tmp_path / "data"), "RUNS": str(tmp_path / "runs"), "SIZE": "32",
           "STEPS1": "3", "STEPS2": "2", "PROMPT": "a large red circle on a black background"}
    data, runs = tmp_path / "data", tmp_path / "runs"
    outputs = []
    for block in steps:
        command = block.strip()
        if command.startswith("python train_stage"):
            command += SHRINK
        done = subprocess.run(["bash", "-ec", command], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"{command}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        outputs.append(done.stdout + done.stderr)

    manifest = json.loads((data / "manifest.json").read_text())  # 1. prepare
    assert manifest["num_samples"] == 3 * PER_CLASS and manifest["class_names"] == sorted(CLASSES)
    assert manifest["image_size"] == 32 and manifest["text_encoder"]["width"] == 384
    assert "kept 48" in outputs[0]

    ckpt1 = sorted((runs / "stage1" / "checkpoints").glob("step_*"))[-1]  # 2. stage 1
    meta1 = json.loads((ckpt1 / "meta.json").read_text())
    assert meta1["step"] == 3 and meta1["preset"] == "small/4" and meta1["model_config"]["patch_size"] == 4
    assert meta1["model_config"]["num_classes"] == 3 and meta1["conditioning"]["class_names"] == sorted(CLASSES)

    record = json.loads((runs / "stage1_samples.json").read_text())  # 3. samples, one file per sample
    assert len(record["images"]) == 3 * 4 and (runs / "stage1_samples.png").is_file()
    assert sorted({os.path.basename(p).rsplit("_", 1)[0] for p in record["images"]}) == sorted(CLASSES)
    assert all(Image.open(p).size == (32, 32) for p in record["images"])

    init = json.loads((runs / "stage2_init" / "meta.json").read_text())  # 4. reparameterize, width from the shards
    assert init["conditioning"]["caption_channels"] == 384 and init["model_config"]["patch_size"] == 4

    ckpt2 = sorted((runs / "stage2" / "checkpoints").glob("step_*"))[-1]  # 5. stage 2, evaluated on the data's captions
    meta2 = json.loads((ckpt2 / "meta.json").read_text())
    assert meta2["step"] == 2 and meta2["family"] == "mmdit" and meta2["model_config"]["patch_size"] == 4
    assert "the data's own captions" in outputs[4] and (runs / "stage2" / "samples" / "step_0000002.png").is_file()

    record = json.loads((runs / "stage2_samples.json").read_text())  # 6. samples of a prompt
    assert record["prompts"] == [env["PROMPT"]] and len(record["images"]) == 4
    assert record["command"].startswith("python app/sample.py ") and "--prompt" in record["command"]
    assert [os.path.basename(p) for p in record["images"]] == [f"a_large_red_circle_on_a_black_background_{i}.png" for i in range(4)]
