"""Few-step LCM distillation on the flow ODE: the consistency function's boundary condition, the
consistency sampler on a known velocity field, a student that starts as its teacher, exact resume,
and the settings that are refused."""
import pytest
import torch
from conftest import compose, stage2_overrides
from safetensors.torch import load_file

from flow.consistency import boundary_coefficients, consistency_function, consistency_sample
from training.config import ConfigError
from training.trainer import train

DISTILL = {"experiment": "demo_distill", "train.lr": "3e-3", "train.warmup_steps": 0, "train.sample_every": 0,
           "train.distill.teacher_steps": 8, "train.sample.steps": 2}


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory, text_shapes_dir):
    tmp = tmp_path_factory.mktemp("teacher")
    train(compose(stage2_overrides(tmp, text_shapes_dir, **{"train.max_steps": 4}), "stage2"))
    return tmp / "run" / "checkpoints" / "step_0000004"


def distill_run(tmp_path, text_shapes_dir, teacher, **extra):
    o = {**DISTILL, "stage.init_from": str(teacher), "train.checkpoint_every": 3, **extra}
    return train(compose(stage2_overrides(tmp_path, text_shapes_dir, **o), "distill"))


def test_the_consistency_function_meets_its_boundary_condition():
    x, v = torch.randn(3, 3, 4, 4), torch.randn(3, 3, 4, 4) * 10
    assert torch.equal(consistency_function(x, torch.zeros(3), v), x)  # f(x, 0) = x, whatever the network says
    c_skip, c_out = boundary_coefficients(torch.tensor([0.0, 0.001, 0.5, 1.0]))
    assert c_skip[0] == 1 and c_out[0] == 0
    assert (c_skip[1:] < 0.003).all() and (c_out[1:] > 0.998).all()  # elsewhere the data prediction x - t v
    t = torch.full((3,), 0.5)
    assert torch.allclose(consistency_function(x, t, v), x - 0.5 * v, atol=1e-4 * float((x - 0.5 * v).abs().max()))


@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_the_consistency_sampler_on_a_known_velocity_field(steps):
    """All data at x*: the exact velocity is v = (x - x*) / t, whose data prediction is x* from anywhere; the
    sampler returns x* at any number of steps (up to c_skip of the last point) and reports each evaluation."""
    target = torch.randn(4, 3, 8, 8)
    seen = []

    def velocity(x, t):
        seen.append(float(t[0]))
        return (x - target) / t.view(-1, 1, 1, 1)

    out = consistency_sample(velocity, torch.randn(4, 3, 8, 8), steps, shift=3.0, seed=0)
    assert len(seen) == steps and seen[0] == 1.0 and all(a > b for a, b in zip(seen, seen[1:]))
    assert torch.allclose(out, target, atol=1e-5)


def test_the_student_starts_as_its_teacher(teacher_ckpt):
    from models.checkpoint import checkpoint_model, load_weights, read_meta
    from models.mmdit import MMDiT, MMDiTConfig
    from training.resume import load_into_extended

    teacher = checkpoint_model(teacher_ckpt, read_meta(teacher_ckpt))
    student = MMDiT(MMDiTConfig(**{**teacher.config.__dict__, "guidance_embed": True}))
    load_into_extended(student, load_weights(teacher_ckpt, ema=True), ["guidance_embedder."])
    x, t, text = torch.randn(2, 3, 16, 16), torch.rand(2), torch.randn(2, 16, 384)
    assert torch.equal(student(x, t, text, guidance=torch.tensor([1.5, 6.0])), teacher(x, t, text))


def test_distillation_trains_a_student_that_resumes_exactly_and_samples_in_few_steps(tmp_path, text_shapes_dir, teacher_ckpt):
    from inference.pipeline import Pipeline
    from models.checkpoint import read_meta

    out = distill_run(tmp_path / "a", text_shapes_dir, teacher_ckpt, **{"train.max_steps": 6})
    ckpt = tmp_path / "a" / "run" / "checkpoints" / "step_0000006"
    meta = read_meta(ckpt)
    assert meta["model_config"]["guidance_embed"] and meta["sampling"]["solver"] == "lcm" and meta["sampling"]["steps"] == 2
    saved = load_file(ckpt / "model.safetensors")
    assert saved["guidance_embedder.linear_2.weight"].abs().sum() > 0  # the guidance input opened
    assert out["final_loss"] == out["final_loss"]
    distill_run(tmp_path / "b", text_shapes_dir, teacher_ckpt, **{"train.max_steps": 6, "train.stop_after": 3})
    distill_run(tmp_path / "b", text_shapes_dir, teacher_ckpt, **{"train.max_steps": 6})
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = load_file(ckpt / name), load_file(tmp_path / "b" / "run" / "checkpoints" / "step_0000006" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    pipe = Pipeline.load(ckpt)
    calls = []
    prompts = ["a large red circle on a white background"] * 2
    images = pipe(prompts, pipe.defaults(), callback=calls.append)
    assert images.shape == (2, 3, 16, 16) and len(calls) == 2  # 2 steps, one evaluation each: no unconditional pass
    other = pipe(prompts, pipe.defaults(cfg_scale=5.0))
    assert (images - other).abs().max() > 1e-4  # the guidance scale reaches the student


def test_lcm_lora_distills_into_adapters(tmp_path, text_shapes_dir, teacher_ckpt):
    """Without a guidance input, with LoRA: adapter-only checkpoints on the teacher, sampled with lcm and no guidance."""
    from inference.pipeline import Pipeline
    from models.checkpoint import read_meta

    distill_run(tmp_path, text_shapes_dir, teacher_ckpt, **{"train.max_steps": 3, "model.guidance_embed": "false",
                                                            "train.lora.rank": 4})
    ckpt = tmp_path / "run" / "checkpoints" / "step_0000003"
    saved, meta = load_file(ckpt / "model.safetensors"), read_meta(ckpt)
    assert saved and all(".lora_" in k for k in saved) and any(v.abs().sum() > 0 for k, v in saved.items() if ".lora_B." in k)
    assert meta["sampling"]["solver"] == "lcm" and meta["sampling"]["cfg_scale"] == 1.0
    pipe = Pipeline.load(ckpt)
    calls = []
    pipe(["a large red circle on a white background"], pipe.defaults(), callback=calls.append)
    assert len(calls) == 2  # 2 steps, no unconditional pass


def test_distillation_settings_that_cannot_work_are_refused(tmp_path, text_shapes_dir, teacher_ckpt):
    with pytest.raises(ConfigError, match="teacher"):
        distill_run(tmp_path / "a", text_shapes_dir, "null")
    with pytest.raises(ConfigError, match="LCM-LoRA"):
        distill_run(tmp_path / "b", text_shapes_dir, teacher_ckpt, **{"train.lora.rank": 4})
    with pytest.raises(ConfigError, match="parallel=fsdp"):
        distill_run(tmp_path / "d", text_shapes_dir, teacher_ckpt, **{"train.parallel": "fsdp"})
    with pytest.raises(ConfigError, match="w range"):
        distill_run(tmp_path / "c", text_shapes_dir, teacher_ckpt, **{"train.distill.w_min": 7})


def test_the_distillation_benchmark_runs_end_to_end(tmp_path, text_shapes_dir, teacher_ckpt):
    """scripts/bench_distill.py on a tiny student: every arm scored and timed, the JSON and grid written."""
    import json

    from scripts.bench_distill import main as bench

    distill_run(tmp_path, text_shapes_dir, teacher_ckpt, **{"train.max_steps": 2})
    out = bench(["--teacher", str(teacher_ckpt), "--student", str(tmp_path / "run" / "checkpoints" / "step_0000002"),
                 "--teacher-steps", "4", "--steps", "1", "2", "--samples", "24", "--repeats", "1",
                 "--json", str(tmp_path / "d.json"), "--grid", str(tmp_path / "d.png")])
    saved = json.loads((tmp_path / "d.json").read_text())
    assert set(saved["results"]) == {"teacher_4", "teacher_1", "student_1", "teacher_2", "student_2"} == set(out["results"])
    assert all(0 <= r["caption_accuracy"] <= 1 and r["images_per_second"] > 0 for r in saved["results"].values())
    assert saved["train_seconds"] is not None and (tmp_path / "d.png").stat().st_size > 0
