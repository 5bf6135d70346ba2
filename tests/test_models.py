import pytest
import torch

from models.ccdit import CCDiT, CCDiTConfig
from models.layers import MLP, Attention, gelu_tanh, gelu_tanh_sigmoid, sincos_2d, timestep_sinusoid
from models.linear import MXFP8EmulatedLinear, convert
from models.presets import PRESETS, build_model, count_parameters, model_config


def tiny(**kw):
    return build_model("ccdit", model_config("ccdit", "tiny", input_size=8, in_channels=3, num_classes=5, **kw))


def test_fresh_model_outputs_exactly_zero():
    torch.manual_seed(0)
    model = tiny()
    x = torch.randn(4, 3, 8, 8)
    out = model(x, torch.rand(4), torch.tensor([0, 1, 4, 5]))  # 5 = null class
    assert out.shape == (4, 3, 8, 8)
    assert torch.equal(out, torch.zeros_like(out))


def test_output_shape_and_gradients_after_perturbing_zero_init():
    torch.manual_seed(0)
    model = tiny()
    for p in model.parameters():
        p.data.add_(0.01 * torch.randn_like(p))
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    out = model(x, torch.tensor([0.1, 0.9]), torch.tensor([2, 3]))
    out.square().mean().backward()
    assert out.abs().sum() > 0
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


def test_presets_match_dit_shapes():
    xl = model_config("ccdit", "XL/2", input_size=32, in_channels=4, num_classes=1000)
    assert (xl.depth, xl.hidden_size, xl.num_heads, xl.patch_size) == (28, 1152, 16, 2)
    # DiT-XL/2 on 256px SD latents has ~675M parameters; ours adds only QK-norm weights.
    with torch.device("meta"):
        n = count_parameters(CCDiT(xl))
    assert 670e6 < n < 680e6
    assert set(PRESETS["ccdit"]) >= {"XL/2", "L/2", "B/2", "S/2", "tiny"}


def test_config_errors_are_clear():
    with pytest.raises(ValueError, match="not divisible by patch_size"):
        CCDiTConfig(input_size=30, patch_size=4)
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        CCDiTConfig(hidden_size=100, num_heads=3)
    with pytest.raises(ValueError, match="unknown ccdit preset"):
        model_config("ccdit", "XXL/2")
    with pytest.raises(ValueError, match="unknown linear backend"):
        convert(CCDiT(CCDiTConfig(input_size=8, hidden_size=32, depth=1, num_heads=2)), "int3")


def test_sincos_2d_matches_diffusers_layout():
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    for grid, base, scale in [(4, 4, 1.0), (8, 4, 1.0), (6, 16, 2.0)]:
        ours = sincos_2d(32, grid, grid, base_size=base, interpolation_scale=scale)
        ref = get_2d_sincos_pos_embed(32, grid, base_size=base, interpolation_scale=scale, output_type="pt")
        torch.testing.assert_close(ours, ref.float(), rtol=0, atol=1e-6)


def test_pos_embed_interpolation_spans_base_range():
    # PixArt interpolation: a 2x grid with the same base size covers the same coordinate range.
    small = sincos_2d(16, 4, 4, base_size=4)
    big = sincos_2d(16, 8, 8, base_size=4)
    # token (2r, 2c) of the big grid sits exactly where token (r, c) of the small grid does
    for r in range(4):
        for c in range(4):
            torch.testing.assert_close(big[(2 * r) * 8 + 2 * c], small[r * 4 + c])


def test_timestep_embedding_matches_diffusers():
    from diffusers.models.embeddings import get_timestep_embedding

    t = torch.tensor([0.0, 1.5, 250.0, 999.0])
    ref = get_timestep_embedding(t, 256, flip_sin_to_cos=True, downscale_freq_shift=0)
    torch.testing.assert_close(timestep_sinusoid(t, 256), ref, rtol=1e-5, atol=1e-5)


def test_gelu_sigmoid_form_is_the_tanh_gelu():
    """The form the compiled model uses (x * sigmoid(2u)) is aten's tanh GELU: values and gradients,
    from the saturated tails (+-30) through zero; eager gelu_tanh is aten's exactly."""
    x = torch.cat([torch.linspace(-30, 30, 2001), 3 * torch.randn(4000, generator=torch.Generator().manual_seed(0))])
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    ref, ours = torch.nn.functional.gelu(a, approximate="tanh"), gelu_tanh_sigmoid(b)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
    g = torch.randn_like(x)
    ref.backward(g), ours.backward(g)
    torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-5)  # |grad| up to ~4.5 here
    assert torch.equal(gelu_tanh(x), torch.nn.functional.gelu(x, approximate="tanh"))  # eager: aten's kernel itself


@pytest.mark.parametrize("backend", ["torch", "mxfp8_emulated"])
def test_mlp_without_autograd_is_the_same_function_in_chunks(backend):
    """Sampling's MLP path (in-place GELU, tokens in chunks) equals the training path; here with
    chunks of 7 token rows over 3 x 5 tokens (7 + 7 + 1)."""
    torch.manual_seed(0)
    mlp = MLP(32, 4.0)
    if backend == "mxfp8_emulated":
        mlp.fc1, mlp.fc2 = MXFP8EmulatedLinear.from_linear(mlp.fc1), MXFP8EmulatedLinear.from_linear(mlp.fc2)
    mlp.INFERENCE_CHUNK_BYTES = 7 * 128 * 4  # 7 rows of the 128-wide fp32 hidden activation
    x = torch.randn(3, 5, 32)
    ref = mlp(x)  # autograd on: fc2(gelu(fc1(x)))
    assert ref.requires_grad
    with torch.no_grad():
        out = mlp(x)
    with torch.inference_mode():
        out_inf = mlp(x)
    assert out.shape == out_inf.shape == (3, 5, 32)
    torch.testing.assert_close(out, ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out_inf, ref.detach(), rtol=1e-5, atol=1e-6)


def test_attention_mask_ignores_padded_keys():
    torch.manual_seed(0)
    attn = Attention(16, 2, qk_norm=True, context_dim=8)
    x = torch.randn(2, 5, 16)
    ctx = torch.randn(2, 6, 8)
    mask = torch.tensor([[True] * 6, [True] * 3 + [False] * 3])
    out = attn(x, ctx, mask)
    # sample 1 with its padding cut off must give the same result
    ref = attn(x[1:], ctx[1:, :3], None)
    torch.testing.assert_close(out[1:], ref, rtol=1e-5, atol=1e-6)
    # the padded values do not matter at all
    ctx2 = ctx.clone()
    ctx2[1, 3:] = 1e3
    torch.testing.assert_close(attn(x, ctx2, mask), out)


def test_qk_norm_normalizes_per_head():
    attn = Attention(16, 4, qk_norm=True)
    q = torch.randn(2, 4, 5, 4) * 100
    rms = attn.norm_q(q).pow(2).mean(-1).sqrt()
    torch.testing.assert_close(rms, torch.ones_like(rms), rtol=1e-3, atol=1e-3)


def test_wrong_input_size_is_an_error():
    model = tiny()
    with pytest.raises(ValueError, match="built for 8x8"):
        model(torch.randn(1, 3, 16, 16), torch.rand(1), torch.tensor([0]))


@pytest.mark.parametrize("family", ["ccdit", "mmdit"])
def test_activation_checkpointing_gives_the_same_gradients(family):
    torch.manual_seed(0)
    extra = {"num_classes": 5} if family == "ccdit" else {"caption_channels": 8}
    model = build_model(family, model_config(family, "tiny", input_size=8, in_channels=3, **extra))
    for p in model.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    x, t = torch.randn(2, 3, 8, 8), torch.rand(2)
    cond = (torch.tensor([1, 5]),) if family == "ccdit" else (torch.randn(2, 4, 8), None)

    def grads(checkpointing):
        model.zero_grad()
        model.gradient_checkpointing = checkpointing
        out = model(x, t, *cond)
        out.square().mean().backward()
        return out.detach(), [p.grad.clone() for p in model.parameters()]

    (o1, g1), (o2, g2) = grads(False), grads(True)
    torch.testing.assert_close(o1, o2)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)
