"""MXFP8 emulation: exact where the format is exact, bounded where it rounds."""
import importlib
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from models.linear import MXFP8EmulatedLinear, mx_quantize, mx_scales, te_linear, transformer_engine

E4M3_GRID = torch.tensor(sorted({float(torch.tensor(b, dtype=torch.uint8).view(torch.float8_e4m3fn)) for b in range(256)} - {float("nan")}))
E4M3_GRID = E4M3_GRID[torch.isfinite(E4M3_GRID)]


def test_representable_values_round_trip_exactly():
    g = torch.Generator().manual_seed(0)
    for k in (-20, -3, 0, 5, 30):
        vals = E4M3_GRID[torch.randint(len(E4M3_GRID), (4, 64), generator=g)]
        vals[:, 0] = 448.0  # pins each block's max, so the block scale is exactly 2**k
        vals[:, 32] = -448.0
        x = vals * 2.0**k
        assert torch.equal(mx_quantize(x), x)
        assert torch.equal(mx_scales(x), torch.full((4, 2), 2.0**k))


def test_scales_are_powers_of_two_from_each_blocks_max():
    x = torch.randn(8, 96) * torch.logspace(-6, 6, 96)
    s = mx_scales(x)
    assert s.shape == (8, 3)
    assert torch.equal(torch.exp2(torch.log2(s).round()), s)  # powers of two
    amax = x.view(8, 3, 32).abs().amax(-1)
    assert torch.all(amax / s <= 448) and torch.all(amax / s > 224)  # the smallest scale that fits the max
    # along another dimension: blocks run down the columns
    torch.testing.assert_close(mx_scales(x.t().contiguous(), dim=0), s.t())


def test_zero_blocks_tiny_blocks_and_saturation():
    x = torch.zeros(2, 64)
    x[1, 32:] = torch.linspace(-1e-3, 1e-3, 32)
    q = mx_quantize(x)
    assert torch.equal(q[0], torch.zeros(64)) and torch.equal(mx_scales(x)[0], torch.ones(2))
    tiny = torch.full((1, 32), 1e-45)  # below E8M0's smallest scale: the exponent clamps at -127, no NaN
    assert torch.isfinite(mx_quantize(tiny)).all() and mx_scales(tiny).item() == 2.0**-127
    # a value right at the block max never saturates; values beyond E4M3's range inside a block clamp to it
    x = torch.tensor([[448.0 * 4] + [1.0] * 31])
    assert mx_quantize(x)[0, 0] == 448.0 * 4


def test_quantization_error_on_gaussian_data_is_within_the_format_bound():
    torch.manual_seed(0)
    x = torch.randn(256, 1024)
    q = mx_quantize(x)
    scale = mx_scales(x).repeat_interleave(32, dim=1)
    err = (q - x).abs()
    # E4M3: 3 mantissa bits -> half an ulp is 2**-4 relative for normals; subnormals step 2**-9 (x scale)
    bound = torch.maximum(x.abs() * 2.0**-4, scale * 2.0**-10)
    assert torch.all(err <= bound * (1 + 1e-6))
    rel = (err.norm() / x.norm()).item()
    assert 0.01 < rel < 0.04  # measured 0.023: real rounding happens, and it is small


def test_emulated_linear_forward_and_backward_use_quantized_operands():
    torch.manual_seed(0)
    lin = MXFP8EmulatedLinear(64, 32)
    ref = torch.nn.Linear(64, 32)
    ref.load_state_dict(lin.state_dict())
    x = torch.randn(5, 7, 64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    y, y_ref = lin(x), ref(x_ref)
    expect = mx_quantize(x.detach()) @ mx_quantize(lin.weight.detach(), 1).t() + lin.bias.detach()
    torch.testing.assert_close(y, expect)
    assert 1e-3 < ((y - y_ref).norm() / y_ref.norm()).item() < 0.05
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    for a, b in [(x.grad, x_ref.grad), (lin.weight.grad, ref.weight.grad)]:
        assert 1e-3 < ((a - b).norm() / b.norm()).item() < 0.06
    torch.testing.assert_close(lin.bias.grad, ref.bias.grad)


def test_shape_constraints_and_missing_transformer_engine_are_clear():
    with pytest.raises(ValueError, match="MXFP8 needs linear dimensions divisible by 32, but in_features=48"):
        MXFP8EmulatedLinear.from_linear(nn.Linear(48, 64))
    try:
        importlib.import_module("transformer_engine.pytorch")
        pytest.skip("Transformer Engine is installed here")
    except (ImportError, RuntimeError):
        pass
    with pytest.raises(RuntimeError, match="precision.linear=te needs NVIDIA Transformer Engine.*mxfp8_emulated"):
        te_linear(nn.Linear(64, 64))
    with pytest.raises(RuntimeError, match="Transformer Engine"):
        transformer_engine()


def test_trainer_runs_with_the_emulated_backend_and_refuses_te(tmp_path, shapes_dir):
    from conftest import compose, tiny_overrides
    from training.trainer import train

    summary = train(compose(tiny_overrides(tmp_path / "mx", shapes_dir, precision="mxfp8_emulated")))
    assert summary["step"] == 6 and summary["final_loss"] < 10
    from models.checkpoint import read_meta

    assert "linear_backend" not in read_meta(summary["checkpoint"])["model_config"]  # precision is not architecture
    assert "linear: mxfp8_emulated" in (Path(summary["checkpoint"]) / "config.yaml").read_text()
    try:
        importlib.import_module("transformer_engine.pytorch")
        return
    except (ImportError, RuntimeError):
        pass
    with pytest.raises(RuntimeError, match="precision.linear=te needs NVIDIA Transformer Engine"):
        train(compose(tiny_overrides(tmp_path / "te", shapes_dir, precision="te")))
    assert not (tmp_path / "te" / "run" / "checkpoints").exists()


def test_checkpoints_travel_between_linear_backends(tmp_path, shapes_dir):
    """precision.linear is precision, not architecture: a run with one backend starts from another's
    checkpoint, and the sampler loads any checkpoint with plain torch linears."""
    import torch.nn as nn

    from conftest import compose, tiny_overrides
    from inference.pipeline import load_model
    from models.linear import MXFP8EmulatedLinear
    from models.checkpoint import load_weights
    from training.trainer import train

    plain = train(compose(tiny_overrides(tmp_path / "plain", shapes_dir)))
    mx = train(compose(tiny_overrides(tmp_path / "mx", shapes_dir, precision="mxfp8_emulated",
                                      **{"stage.init_from": plain["checkpoint"], "train.max_steps": 2})))
    assert mx["step"] == 2 and mx["final_loss"] < 10
    model, _, meta = load_model(mx["checkpoint"])
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert linears and not any(isinstance(m, MXFP8EmulatedLinear) for m in linears)
    weights = load_weights(mx["checkpoint"], ema=True)
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


class _WithExtraState(nn.Module):
    """A linear that, like TE's modules, keeps extra state (TE pickles its FP8 scaling history into it)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.seen = 0

    def get_extra_state(self):
        return torch.tensor([self.seen], dtype=torch.uint8)

    def set_extra_state(self, state):
        raise AssertionError("extra state must not be loaded from a checkpoint")


def test_te_extra_state_is_neither_saved_nor_expected(tmp_path):
    from safetensors.torch import load_file

    from models.linear import load_portable
    from training.checkpoint import save_checkpoint

    model = nn.Sequential(_WithExtraState(), nn.Linear(4, 2))
    assert "0._extra_state" in model.state_dict()
    path = save_checkpoint(tmp_path, 1, model, model, {"step": 1}, "x: 1\n", {"stage": "stage1"})
    saved = load_file(path / "model.safetensors")
    assert set(saved) == {"0.proj.weight", "0.proj.bias", "1.weight", "1.bias"}
    other = nn.Sequential(_WithExtraState(), nn.Linear(4, 2))
    load_portable(other, saved)  # no _extra_state in the file, none set
    assert all(torch.equal(v, saved[k]) for k, v in other.state_dict().items() if k in saved)
    with pytest.raises(RuntimeError, match=r"missing \['1.bias'\]"):
        load_portable(other, {k: v for k, v in saved.items() if k != "1.bias"})
    with pytest.raises(RuntimeError, match=r"unexpected \['extra'\]"):
        load_portable(other, {**saved, "extra": torch.zeros(1)})
