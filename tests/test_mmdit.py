import pytest
import torch

from models.diffusers_pixart import IncompatibleModel, from_diffusers, to_diffusers
from models.mmdit import MMDiT, MMDiTConfig


def tiny(**kw):
    base = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, caption_channels=24, qk_norm=False)
    return MMDiT(MMDiTConfig(**{**base, **kw}))


def _randomize(model):
    torch.manual_seed(1)
    for p in model.parameters():
        p.data.normal_(0, 0.1)
    return model


def _inputs(n=3, L=5):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, 8, 8, generator=g)
    t = torch.rand(n, generator=g)
    enc = torch.randn(n, L, 24, generator=g)
    mask = torch.ones(n, L, dtype=torch.bool)
    mask[1, 3:] = False  # one padded caption
    return x, t, enc, mask


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_fresh_mmdit_outputs_zero_and_ignores_text():
    torch.manual_seed(0)
    model = tiny(qk_norm=True)
    x, t, enc, mask = _inputs()
    assert torch.equal(model(x, t, enc, mask), torch.zeros_like(x))
    for p in model.final_layer.parameters():
        p.data.normal_(0, 0.1)
    # cross-attention output starts closed: the text does not change the prediction
    torch.testing.assert_close(model(x, t, enc, mask), model(x, t, torch.randn_like(enc), None))


def test_padding_does_not_change_the_output():
    model = _randomize(tiny())
    x, t, enc, mask = _inputs()
    out = model(x, t, enc, mask)
    enc2 = enc.clone()
    enc2[1, 3:] = 100.0  # garbage in the padded positions
    torch.testing.assert_close(model(x, t, enc2, mask), out)
    torch.testing.assert_close(model(x[1:2], t[1:2], enc[1:2, :3], None), out[1:2], rtol=1e-5, atol=1e-6)


def test_export_to_diffusers_gives_the_same_output():
    model = _randomize(tiny()).eval()
    ref = to_diffusers(model).eval()
    x, t, enc, mask = _inputs()
    with torch.no_grad():
        ours = model(x, t, enc, mask)
        theirs = ref(x, timestep=t * 1000, encoder_hidden_states=enc, encoder_attention_mask=mask.long()).sample
    assert _rel(ours, theirs) <= 1e-5


def test_a_stage3_model_exports_with_its_base_grid():
    """Trained on a 12x12 latent grid over a 6x6 base range (what 2->3 makes): diffusers, given the base
    size as sample_size, interpolates the position grid the same way."""
    model = _randomize(tiny(input_size=12, base_size=3)).eval()
    ref = to_diffusers(model).eval()
    assert ref.config.sample_size == 6
    g = torch.Generator().manual_seed(0)
    x, t, enc = torch.randn(2, 4, 12, 12, generator=g), torch.rand(2, generator=g), torch.randn(2, 5, 24, generator=g)
    with torch.no_grad():
        ours = model(x, t, enc)
        theirs = ref(x, timestep=t * 1000, encoder_hidden_states=enc).sample
    assert _rel(ours, theirs) <= 1e-5


def test_import_from_diffusers_gives_the_same_output(tmp_path):
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(3)
    ref = PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, num_layers=2,
        cross_attention_dim=32, caption_channels=24, sample_size=8, patch_size=2, use_additional_conditions=False,
    )
    for p in ref.parameters():
        p.data.normal_(0, 0.1)
    ref.save_pretrained(tmp_path / "pixart")
    model = from_diffusers(str(tmp_path / "pixart")).eval()
    x, t, enc, mask = _inputs()
    with torch.no_grad():
        theirs = ref.eval()(x, timestep=t * 1000, encoder_hidden_states=enc, encoder_attention_mask=mask.long()).sample
        ours = model(x, t, enc, mask)
    assert _rel(ours, theirs) <= 1e-5
    # and back again: the round trip is exact
    back = to_diffusers(model)
    for k, v in ref.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


def test_non_pixart_presets_are_refused():
    with pytest.raises(IncompatibleModel, match="qk_norm=True"):
        to_diffusers(tiny(qk_norm=True))
    with pytest.raises(IncompatibleModel, match="mlp_ratio=2.0"):
        to_diffusers(tiny(mlp_ratio=2.0))
    with pytest.raises(IncompatibleModel, match="pos_grid='isotropic'"):
        to_diffusers(tiny(pos_grid="isotropic"))
    with pytest.raises(IncompatibleModel, match="micro_embedder='mlp'"):  # width 32: PixArt-MS's thirds do not fit
        to_diffusers(tiny(micro_conditions=True))


def test_export_script_from_a_reparameterized_checkpoint(tmp_path, shapes_dir):
    from diffusers import PixArtTransformer2DModel

    from conftest import compose, tiny_overrides
    from inference.pipeline import load_model
    from reparameterize import main as reparam_main
    from scripts.export_diffusers import main as export_main
    from training.trainer import train

    stage1 = train(compose(tiny_overrides(tmp_path / "noqk", shapes_dir, **{"model.qk_norm": False})))["checkpoint"]
    reparam_main([stage1, str(tmp_path / "init"), "--caption-channels", "24"])
    export_main([str(tmp_path / "init"), str(tmp_path / "exported")])
    theirs = PixArtTransformer2DModel.from_pretrained(tmp_path / "exported").eval()  # what diffusers users load
    ours, _, _ = load_model(tmp_path / "init")
    x, t, enc, mask = _inputs()
    x = x[:, :3, :16, :16].contiguous()
    with torch.no_grad():
        a = ours(x, t, enc, mask)
        b = theirs(x, timestep=t * 1000, encoder_hidden_states=enc, encoder_attention_mask=mask.long()).sample
    assert _rel(a, b) <= 1e-5
    with pytest.raises(SystemExit, match="only mmDiT"):
        export_main([stage1, str(tmp_path / "x")])
    qk = train(compose(tiny_overrides(tmp_path / "qk", shapes_dir)))["checkpoint"]
    reparam_main([qk, str(tmp_path / "init_qk"), "--caption-channels", "24"])
    with pytest.raises(SystemExit, match="qk_norm=True"):
        export_main([str(tmp_path / "init_qk"), str(tmp_path / "y")])


def test_joint_attention_block_masks_padding_and_trains_every_parameter():
    torch.manual_seed(0)
    fresh = tiny(block="joint", qk_norm=True)
    x, t, enc, mask = _inputs()
    assert torch.equal(fresh(x, t, enc, mask), torch.zeros_like(x))  # adaLN-Zero + zero final layer
    model = _randomize(tiny(block="joint", qk_norm=True))
    out = model(x, t, enc, mask)
    garbage = enc.clone()
    garbage[1, 3:] = 1e3  # padded tokens of caption 1
    torch.testing.assert_close(model(x, t, garbage, mask), out, rtol=0, atol=1e-5)
    assert _rel(model(x, t, enc.flip(0), mask.flip(0)), out) > 1e-3  # the text does matter (0.9% here)
    out.square().mean().backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []  # DDP needs every parameter used (the last block's text stream is pre-only)
    assert not hasattr(model.blocks[-1], "context_mlp") and hasattr(model.blocks[0], "context_mlp")
    with pytest.raises(IncompatibleModel, match="block='joint'"):
        to_diffusers(model)


def test_exported_model_in_diffusers_pipeline_matches_our_sampler():
    """PixArtAlphaPipeline + FlowMatchEulerDiscreteScheduler, fed the same latents, timesteps and
    text embeddings, lands where our Euler sampler (with CFG) does."""
    from diffusers import PixArtAlphaPipeline

    from models.diffusers_pixart import flow_scheduler

    from flow.sampling import sample, time_grid
    from inference.pipeline import call_model

    model = _randomize(tiny()).eval()
    for p in model.parameters():
        p.data.mul_(0.5)  # keep the random model's velocities moderate over several steps
    theirs = to_diffusers(model).eval()
    x, _, enc, mask = _inputs()
    null_enc, null_mask = torch.zeros(3, 5, 24), torch.zeros(3, 5, dtype=torch.bool)
    null_mask[:, :2] = True
    null_enc[:, :2] = torch.randn(2, 24, generator=torch.Generator().manual_seed(3))
    steps, shift, cfg = 6, 2.0, 3.5
    with torch.no_grad():
        ours = sample(lambda z, t, c: call_model(model, z, t, c), x,
                      {"encoder_hidden_states": enc, "encoder_attention_mask": mask},
                      {"encoder_hidden_states": null_enc, "encoder_attention_mask": null_mask},
                      cfg_scale=cfg, steps=steps, shift=shift)
    pipe = PixArtAlphaPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=theirs,
                               scheduler=flow_scheduler())
    sigmas = time_grid(steps, shift)[:-1].tolist()  # our shifted grid; the scheduler appends the final 0
    latents = pipe(negative_prompt=None, prompt_embeds=enc, prompt_attention_mask=mask.long(), negative_prompt_embeds=null_enc,
                   negative_prompt_attention_mask=null_mask.long(), latents=x.clone(), sigmas=sigmas, guidance_scale=cfg,
                   height=8 * 8, width=8 * 8, output_type="latent", use_resolution_binning=False, return_dict=False)[0]
    assert _rel(latents, ours) <= 1e-4
    assert _rel(ours, x) > 0.1  # the sampler did move


@pytest.mark.parametrize("block", ["pixart", "joint"])
def test_text_cache_gives_the_same_velocity_and_samples(block):
    """Sampling computes the text's step-independent work once (MMDiT.cache_text): the caption
    projection, each PixArt block's cross-attention keys/values, and drops key columns that are
    padded in every row. Same velocities as the plain forward, same samples through the pipeline."""
    from flow.sampling import sample
    from inference.pipeline import call_model, prepare_condition

    model = _randomize(tiny(block=block, qk_norm=True)).eval()
    x, t, enc, mask = _inputs(L=7)
    mask[:, 5:] = False  # two trailing positions padded in every caption: dropped by the cache
    cache = model.cache_text(enc, mask)
    assert cache.context.shape[1] == 5 and (cache.kv is None) == (block == "joint")
    with torch.no_grad():
        ref = model(x, t, enc, mask)
        torch.testing.assert_close(model(x, t, text_cache=cache), ref, rtol=1e-5, atol=1e-6)
        full = torch.ones_like(mask)
        torch.testing.assert_close(model(x, t, text_cache=model.cache_text(enc, full)), model(x, t, enc, full), rtol=1e-5, atol=1e-6)
        cond = {"encoder_hidden_states": enc, "encoder_attention_mask": mask}
        uncond = {"encoder_hidden_states": torch.zeros_like(enc), "encoder_attention_mask": mask & (torch.arange(7) < 1)}
        args = dict(cfg_scale=3.0, steps=4)
        plain = sample(lambda z, s, c: call_model(model, z, s, c), x, cond, uncond, **args)
        cached = sample(lambda z, s, c: call_model(model, z, s, c), x, cond, uncond, prepare=lambda c: prepare_condition(model, c), **args)
    torch.testing.assert_close(cached, plain, rtol=1e-5, atol=1e-5)
    assert _rel(plain, x) > 0.05  # the sampler did move
    labels = {"class_labels": torch.tensor([1, 2])}
    assert prepare_condition(model, labels) is labels  # class ids pass through
    with pytest.raises(ValueError, match="holds 3 conditions for a batch of 6"):
        model(torch.cat([x, x]), torch.cat([t, t]), text_cache=cache)
    with pytest.raises(TypeError, match="encoder_hidden_states"):
        model(x, t)


@pytest.mark.parametrize("block", ["pixart", "joint"])
def test_cpu_bf16_autocast_keeps_attention_in_fp32_and_stays_close(block):
    """precision.autocast_cpu: the linears run in bf16, QK-norm and attention in fp32 (PyTorch's CPU
    flash attention is slower in bf16); output and gradients stay close to fp32 training's."""
    import torch.nn.functional as F

    model = _randomize(tiny(block=block, qk_norm=True))
    x, t, enc, mask = _inputs()
    ref = model(x, t, enc, mask)
    ref.square().mean().backward()
    ref_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    norm_inputs, attention_inputs = [], []
    norms = [m for m in model.modules() if isinstance(m, torch.nn.RMSNorm)]
    hooks = [m.register_forward_pre_hook(lambda mod, args: norm_inputs.append(args[0].dtype)) for m in norms]
    real_sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        attention_inputs.append((q.dtype, k.dtype, v.dtype, torch.is_autocast_enabled("cpu")))
        return real_sdpa(q, k, v, **kw)

    F.scaled_dot_product_attention = spy
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x, t, enc, mask)
            assert model.blocks[0].attn.to_q(torch.randn(2, 3, 32)).dtype == torch.bfloat16  # the linears do run in bf16
    finally:
        F.scaled_dot_product_attention = real_sdpa
        for h in hooks:
            h.remove()
    attentions = 2 * (1 if block == "joint" else 2)  # per block: joint attention, or self + cross
    assert len(norms) >= attentions and len(norm_inputs) == len(norms) and set(norm_inputs) == {torch.float32}
    assert len(attention_inputs) == attentions and set(attention_inputs) == {(torch.float32,) * 3 + (False,)}
    assert 1e-4 < _rel(out.float(), ref) < 3e-2  # bf16 matmuls: close, not equal
    out.float().square().mean().backward()
    for p, g in zip(model.parameters(), ref_grads):
        assert F.cosine_similarity(p.grad.flatten(), g.flatten(), dim=0) > 0.99


@pytest.mark.slow
@pytest.mark.parametrize("block", ["pixart", "joint"])
def test_compiled_mmdit_is_one_graph_and_the_same_function(block):
    """torch.compile(fullgraph=True) refuses a graph break: the text mask's "is anything padded?"
    test must not run inside the compiled graph (it keeps the mask there, which computes the same)."""
    model = _randomize(tiny(block=block, qk_norm=True))
    x, t, enc, mask = _inputs()
    compiled = torch.compile(model, fullgraph=True)
    full = torch.ones_like(mask)
    for m in (mask, full):
        torch.testing.assert_close(compiled(x, t, enc, m), model(x, t, enc, m), rtol=1e-4, atol=1e-5)
