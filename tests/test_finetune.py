"""LoRA adapters with peft: a frozen base, adapter-only checkpoints tied to their base, exact resume,
merge, PEFT export that diffusers loads, and the settings that are refused."""
import json

import pytest
import torch
from conftest import compose, stage2_overrides
from safetensors.torch import load_file

from models.checkpoint import read_meta
from training.config import ConfigError
from training.trainer import train

LORA = {"train.lora.rank": 4, "train.lora.alpha": 8, "train.ema_decay": 0.5, "train.ema_warmup": "false", "train.lr": "3e-3",
        "train.warmup_steps": 0}


@pytest.fixture(scope="module")
def base_ckpt(tmp_path_factory, text_shapes_dir):
    """A tiny stage-2 model (diffusers-exportable: QK-norm off), trained a few steps: the base to adapt."""
    tmp = tmp_path_factory.mktemp("lora_base")
    train(compose(stage2_overrides(tmp, text_shapes_dir, **{"model.qk_norm": "false", "train.max_steps": 4}), "stage2"))
    return tmp / "run" / "checkpoints" / "step_0000004"


def lora_run(tmp_path, text_shapes_dir, base, **extra):
    o = {**LORA, "stage.init_from": str(base), "model.qk_norm": "false", "train.checkpoint_every": 3, **extra}
    return train(compose(stage2_overrides(tmp_path, text_shapes_dir, **o), "stage2"))


def test_lora_trains_only_adapters_and_saves_them_with_the_base_hash(tmp_path, text_shapes_dir, base_ckpt):
    from models.adapters import file_sha256
    from models.checkpoint import checkpoint_model, load_weights

    out = lora_run(tmp_path, text_shapes_dir, base_ckpt)
    ckpt = tmp_path / "run" / "checkpoints" / "step_0000006"
    saved = load_file(ckpt / "model.safetensors")
    assert saved and all(".lora_A." in k or ".lora_B." in k for k in saved)  # adapters only
    assert any(v.abs().sum() > 0 for k, v in saved.items() if ".lora_B." in k)  # B moved off its zero init
    meta = read_meta(ckpt)
    assert meta["adapter"]["rank"] == 4 and meta["adapter"]["base"]["sha256"] == file_sha256(base_ckpt / "ema.safetensors")
    state = torch.load(ckpt / "train_state.pt", weights_only=True)
    assert len(state["optimizer"]["state"]) == len(saved)  # the optimizer holds the adapters, nothing else
    model = checkpoint_model(ckpt, meta)  # base (checked) + adapters
    base = load_weights(base_ckpt, ema=True)
    for name, p in model.named_parameters():  # the base did not move
        if "lora_" not in name:
            assert torch.equal(p, base[name.replace(".base_layer", "")]), name
    n_adapter = sum(v.numel() for v in saved.values())
    assert n_adapter < 0.2 * sum(v.numel() for v in base.values())
    assert out["final_loss"] == out["final_loss"]  # finite


def test_lora_resume_is_exact(tmp_path, text_shapes_dir, base_ckpt):
    lora_run(tmp_path / "a", text_shapes_dir, base_ckpt)
    lora_run(tmp_path / "b", text_shapes_dir, base_ckpt, **{"train.stop_after": 3})
    lora_run(tmp_path / "b", text_shapes_dir, base_ckpt, resume="auto")
    for name in ("model.safetensors", "ema.safetensors"):
        a = load_file(tmp_path / "a" / "run" / "checkpoints" / "step_0000006" / name)
        b = load_file(tmp_path / "b" / "run" / "checkpoints" / "step_0000006" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def _inputs(model, n=2):
    g = torch.Generator().manual_seed(0)
    c = model.config
    x = torch.randn(n, c.in_channels, c.input_size, c.input_size, generator=g)
    text = torch.randn(n, 5, c.caption_channels, generator=g)
    mask = torch.ones(n, 5, dtype=torch.bool)
    mask[1, 3:] = False
    return x, torch.tensor([0.3, 0.8]), text, mask


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def test_merge_and_peft_export_give_the_adapted_model(tmp_path, text_shapes_dir, base_ckpt):
    from diffusers import PixArtTransformer2DModel
    from peft import PeftModel

    from models.checkpoint import checkpoint_model
    from scripts.lora import main as lora_main

    lora_run(tmp_path, text_shapes_dir, base_ckpt)
    ckpt = tmp_path / "run" / "checkpoints" / "step_0000006"
    adapted = checkpoint_model(ckpt, read_meta(ckpt)).eval()
    for name, p in adapted.named_parameters():  # larger adapters than six steps make, so every check has teeth
        if ".lora_B." in name:
            p.data.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    from models.adapters import adapter_state
    from models.checkpoint import write_checkpoint

    meta = read_meta(ckpt)
    write_checkpoint(tmp_path / "bigger", {**meta, "has_ema": False}, adapter_state(adapted))
    x, t, text, mask = _inputs(adapted)
    with torch.no_grad():
        want = adapted(x, t, text, mask)
        base = checkpoint_model(base_ckpt, read_meta(base_ckpt)).eval()(x, t, text, mask)
    assert _rel(want, base) > 1e-2  # the adapters change the function

    lora_main(["merge", str(tmp_path / "bigger"), str(tmp_path / "merged")])
    merged_meta = read_meta(tmp_path / "merged")
    assert "adapter" not in merged_meta and merged_meta["merged_from"]["adapter"]["rank"] == 4
    merged = checkpoint_model(tmp_path / "merged", merged_meta).eval()
    assert not any("lora" in k for k in merged.state_dict())
    with torch.no_grad():
        assert _rel(merged(x, t, text, mask), want) <= 1e-5

    lora_main(["peft", str(tmp_path / "bigger"), str(tmp_path / "peft"), "--base-out", str(tmp_path / "base_diffusers")])
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8
    theirs = PeftModel.from_pretrained(PixArtTransformer2DModel.from_pretrained(tmp_path / "base_diffusers"), tmp_path / "peft").eval()
    with torch.no_grad():
        got = theirs(x, encoder_hidden_states=text, timestep=t * 1000, encoder_attention_mask=mask.long()).sample
    assert _rel(got, want) <= 1e-5


def test_lora_settings_that_cannot_work_are_refused(tmp_path, text_shapes_dir, base_ckpt):
    with pytest.raises(ConfigError, match="stage.init_from is not set"):
        train(compose(stage2_overrides(tmp_path / "a", text_shapes_dir, **{"train.lora.rank": 4}), "stage2"))
    with pytest.raises(ConfigError, match="precision.linear=mxfp8_emulated"):
        lora_run(tmp_path / "b", text_shapes_dir, base_ckpt, precision="mxfp8_emulated")
    from models.adapters import AdapterError

    with pytest.raises(AdapterError, match="match no linear layer"):
        lora_run(tmp_path / "c", text_shapes_dir, base_ckpt, **{"train.lora.target_modules": "[to_qq]"})


def test_pipeline_export_loads_in_diffusers_and_samples_like_ours(tmp_path, text_shapes_dir, base_ckpt):
    """export --pipeline of an adapter checkpoint -> DiffusionPipeline.from_pretrained: a PixArtAlphaPipeline whose
    scheduler reloads as saved, whose latents equal our sampler's (dpm++, same noise and embeddings), and whose
    own text encoding is ours (up to the fp16 rounding of our stored embeddings); the card carries the config."""
    from diffusers import DiffusionPipeline, DPMSolverMultistepScheduler, PixArtAlphaPipeline

    from inference.pipeline import Pipeline
    from scripts.export_diffusers import main as export_main

    lora_run(tmp_path, text_shapes_dir, base_ckpt)
    ckpt = tmp_path / "run" / "checkpoints" / "step_0000006"
    export_main([str(ckpt), str(tmp_path / "pipe"), "--pipeline"])
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "pipe", vae=None)  # pixel space: no autoencoder to load
    assert isinstance(pipe, PixArtAlphaPipeline) and isinstance(pipe.scheduler, DPMSolverMultistepScheduler)
    assert pipe.scheduler.config.prediction_type == "flow_prediction" and pipe.scheduler.config.use_flow_sigmas
    card = (tmp_path / "pipe" / "README.md").read_text()
    assert "lora:" in card and "rank: 4" in card and "stage2" in card

    ours = Pipeline.load(ckpt)
    prompts = ["a large red circle on a white background", "a small blue square on a black background"]
    settings = ours.defaults(solver="dpm++", steps=6, cfg_scale=3.0, seed=5)
    images = ours(ours.conditioning.parse(prompts), settings)  # pixel space: the images are the latents
    cond, uncond = ours.conditioning.guided(ours.conditioning.parse(prompts), "cpu", None)
    from inference.pipeline import initial_noise

    noise = initial_noise(2, ours.latent_shape(), 5, "cpu")
    latents = pipe(prompt_embeds=cond["encoder_hidden_states"], prompt_attention_mask=cond["encoder_attention_mask"].long(),
                   negative_prompt_embeds=uncond["encoder_hidden_states"],
                   negative_prompt_attention_mask=uncond["encoder_attention_mask"].long(), negative_prompt=None,
                   latents=noise.clone(), num_inference_steps=6, guidance_scale=3.0, height=16 * 8, width=16 * 8,
                   output_type="latent", use_resolution_binning=False, return_dict=False)[0]
    assert _rel(latents.clamp(-1, 1), images) <= 1e-4
    embeds, mask, _, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, clean_caption=False, max_sequence_length=16)
    assert torch.equal(mask.bool(), cond["encoder_attention_mask"])
    assert _rel(embeds * mask[..., None], cond["encoder_hidden_states"]) <= 1e-3


def test_adapters_refuse_a_changed_base_and_dreambooth_data_has_its_prior(tmp_path, text_shapes_dir, base_ckpt):
    """An adapter checkpoint whose base weights changed is refused; dreambooth_data.py writes the instance images
    under their prompt and class images that the base generates, each with its caption beside it."""
    import shutil

    import numpy as np
    from PIL import Image

    from models.checkpoint import CheckpointError, checkpoint_model
    from scripts.dreambooth_data import main as dreambooth_data

    base = tmp_path / "base"
    shutil.copytree(base_ckpt, base)
    lora_run(tmp_path, text_shapes_dir, base, **{"train.max_steps": 3})
    ckpt = tmp_path / "run" / "checkpoints" / "step_0000003"
    checkpoint_model(ckpt, read_meta(ckpt))  # the base as trained on: loads
    from safetensors.torch import save_file

    weights = load_file(base / "ema.safetensors")
    weights["final_layer.linear.bias"] = weights["final_layer.linear.bias"] + 1e-3
    save_file(weights, base / "ema.safetensors")
    with pytest.raises(CheckpointError, match="changed since they were trained"):
        checkpoint_model(ckpt, read_meta(ckpt))

    (tmp_path / "inst").mkdir()
    for i in range(3):
        Image.fromarray(np.full((16, 16, 3), 40 * i, np.uint8)).save(tmp_path / "inst" / f"{i}.png")
    (tmp_path / "inst" / "2.txt").write_text("a sks square on a white background\n")
    record = dreambooth_data(["--instance-dir", str(tmp_path / "inst"), "--instance-prompt", "a sks circle", "--out",
                              str(tmp_path / "db"), "--base", str(base_ckpt), "--class-prompt", "a red circle",
                              "--class-prompt", "a blue square", "--num-class-images", "4", "--steps", "2", "--device", "cpu"])
    captions = {p.stem: p.read_text().strip() for p in (tmp_path / "db").glob("*.txt")}
    assert record["instances"] == 3 and record["class_images"] == 4
    assert [captions[f"instance_{i:04d}"] for i in range(3)] == ["a sks circle", "a sks circle", "a sks square on a white background"]
    assert [captions[f"class_{i:04d}"] for i in range(4)] == ["a red circle", "a blue square"] * 2
    assert all((tmp_path / "db" / f"class_{i:04d}.png").is_file() for i in range(4))
    with pytest.raises(SystemExit, match="needs --base"):
        dreambooth_data(["--instance-dir", str(tmp_path / "inst"), "--instance-prompt", "x", "--out", str(tmp_path / "db2"),
                         "--num-class-images", "2"])


def test_dreambooth_data_with_real_class_images_and_repeats(tmp_path):
    import numpy as np
    from PIL import Image

    from scripts.dreambooth_data import main as dreambooth_data

    for folder, n in (("inst", 2), ("cls", 3)):
        (tmp_path / folder).mkdir()
        for i in range(n):
            Image.fromarray(np.full((8, 8, 3), 50 * i, np.uint8)).save(tmp_path / folder / f"{i}.png")
            if folder == "cls":
                (tmp_path / folder / f"{i}.txt").write_text(f"a class image {i}\n")
    record = dreambooth_data(["--instance-dir", str(tmp_path / "inst"), "--instance-prompt", "a sks thing", "--out", str(tmp_path / "db"),
                              "--class-dir", str(tmp_path / "cls"), "--instance-repeats", "3"])
    names = sorted(p.stem for p in (tmp_path / "db").glob("*.png"))
    assert record["class_images"] == 3 and names == [f"class_{i:04d}" for i in range(3)] + [
        f"instance_{i:04d}_{r}" for i in range(2) for r in range(3)]
    assert (tmp_path / "db" / "class_0002.txt").read_text().strip() == "a class image 2"
    with pytest.raises(SystemExit, match="not both"):
        dreambooth_data(["--instance-dir", str(tmp_path / "inst"), "--instance-prompt", "x", "--out", str(tmp_path / "db2"),
                         "--class-dir", str(tmp_path / "cls"), "--num-class-images", "2", "--base", "b", "--class-prompt", "c"])
