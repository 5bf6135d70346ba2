"""Transformer Engine on a GPU: the `te` backend's numerics, the trainer with it, and fused wgrad.

Skipped where there is no CUDA GPU with TE's PyTorch extension (CI, the CPU machines). Run on a
Hopper or Blackwell GPU with TE installed:

    pytest -q tests/test_te_gpu.py
"""
import importlib
import os
import sys

import pytest
import torch
import torch.nn as nn

from conftest import ROOT


def _te_available() -> bool:
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9:
        return False
    try:
        importlib.import_module("transformer_engine.pytorch")
    except (ImportError, RuntimeError):
        return False
    return True


pytestmark = pytest.mark.skipif(not _te_available(), reason="needs a Hopper/Blackwell GPU with Transformer Engine")
HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9
RECIPES = ["current", "delayed"] + ([] if HOPPER else ["mxfp8"])


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("recipe", RECIPES)
def test_te_linear_is_fp8_close_to_fp32(recipe):
    """Forward and both gradients within FP8's error of an fp32 nn.Linear with the same weights,
    and measurably off it (so the GEMMs really ran in FP8, not bf16 or fp32)."""
    from models.linear import fp8_context, te_linear

    torch.manual_seed(0)
    ref = nn.Linear(256, 512).cuda()
    lin = te_linear(ref)  # a te.Linear holding a copy of ref's weights
    x = torch.randn(4, 64, 256, device="cuda")
    xr, xt = x.clone().requires_grad_(), x.clone().requires_grad_()
    g = torch.randn(4, 64, 512, device="cuda")
    (ref(xr) * g).sum().backward()
    for _ in range(3):  # delayed scaling's first steps use the scale of an empty amax history
        lin.zero_grad(set_to_none=True)
        xt.grad = None
        with fp8_context("te", recipe):
            out = lin(xt)
        (out * g).sum().backward()
    fwd, dx, dw = rel(out, ref(x)), rel(xt.grad, xr.grad), rel(lin.weight.grad, ref.weight.grad)
    print(f"{recipe}: relative error forward {fwd:.4f}, dgrad {dx:.4f}, wgrad {dw:.4f}")
    assert 2e-3 < fwd < 0.08, fwd  # bf16 would be ~3e-3 at most; E4M3 ~ 2-4%
    assert 2e-3 < dx < 0.15 and 2e-3 < dw < 0.15, (dx, dw)  # gradients in E5M2 (HYBRID)
    torch.testing.assert_close(lin.bias.grad, ref.bias.grad, rtol=2e-2, atol=1e-3)


def test_mxfp8_recipe_refused_on_hopper():
    from models.linear import te_recipe

    if not HOPPER:
        pytest.skip("Blackwell runs MXFP8")
    with pytest.raises(RuntimeError, match="MXFP8 block scaling needs a Blackwell GPU .* precision.te_recipe=current"):
        te_recipe("mxfp8")
    assert type(te_recipe("auto")).__name__ == "Float8CurrentScaling"


def test_te_model_starts_from_the_same_init_as_torch():
    """The converter gives every te.Linear the weights the model was initialized with (not TE's own init),
    and leaves the declared high-precision modules plain."""
    from models.linear import convert, high_precision
    from models.presets import build_model, model_config

    torch.manual_seed(0)
    model = build_model("mmdit", model_config("mmdit", "demo", input_size=8, in_channels=3, caption_channels=64)).cuda()
    init = {k: v.clone() for k, v in model.state_dict().items()}
    convert(model, "te")
    te_linears = {n: m for n, m in model.named_modules() if type(m).__module__.startswith("transformer_engine")}
    assert len(te_linears) > 20
    assert not any(n.split(".")[0] in high_precision(model) for n in te_linears)
    for name, m in te_linears.items():
        assert torch.equal(m.weight.detach(), init[f"{name}.weight"]) and torch.equal(m.bias.detach(), init[f"{name}.bias"])


@pytest.mark.parametrize("block", ["pixart", "joint"])
def test_te_mmdit_forward_backward_close_to_bf16(block):
    """The whole model under FP8: outputs within a few percent of bf16 autocast with the same weights."""
    from models.linear import convert, fp8_context, load_portable
    from models.presets import build_model, model_config

    torch.manual_seed(0)
    cfg = dict(input_size=16, in_channels=4, caption_channels=64, block=block)
    ref = build_model("mmdit", model_config("mmdit", "demo", **cfg)).cuda()
    for p in ref.parameters():  # leave the zero init so every path carries signal
        p.data.add_(0.02 * torch.randn_like(p))
    fp8 = convert(build_model("mmdit", model_config("mmdit", "demo", **cfg)).cuda(), "te")
    load_portable(fp8, ref.state_dict())
    x, t = torch.randn(8, 4, 16, 16, device="cuda"), torch.rand(8, device="cuda")
    text, mask = torch.randn(8, 16, 64, device="cuda"), torch.ones(8, 16, dtype=torch.bool, device="cuda")
    mask[:4, 10:] = False  # padded captions too
    outs = {}
    for name, model in (("bf16", ref), ("fp8", fp8)):
        with torch.autocast("cuda", dtype=torch.bfloat16), fp8_context("te" if name == "fp8" else "torch", "current"):
            out = model(x, t, text, mask)
        out.float().square().mean().backward()
        outs[name] = out.float()
    err = rel(outs["fp8"], outs["bf16"])
    grad_err = rel(fp8.blocks[0].mlp.fc1.weight.grad, ref.blocks[0].mlp.fc1.weight.grad)
    print(f"{block}: FP8 vs bf16 output {err:.4f}, first MLP wgrad {grad_err:.4f}")
    assert err < 0.1 and grad_err < 0.25
    assert torch.isfinite(outs["fp8"]).all()


def test_fused_wgrad_with_te_matches_plain_wgrad():
    """TE's fuse_wgrad_accumulation, switched on by training/fused_wgrad.py: the weight gradient lands
    in fp32 main_grad (weight.grad stays empty) and equals the unfused one; two micro-batches add."""
    from models.linear import fp8_context, te_linear
    from training import fused_wgrad

    torch.manual_seed(0)
    plain, fused = (te_linear(nn.Linear(128, 256).cuda()) for _ in range(2))
    fused.load_state_dict(plain.state_dict())
    model = nn.Sequential(fused)
    owned = fused_wgrad.enable(model)
    assert [n for n, _ in owned] == ["0.weight"]
    xs = [torch.randn(64, 128, device="cuda") for _ in range(2)]
    for x in xs:
        with fp8_context("te", "current"):
            plain(x).square().mean().backward()
            model(x).square().mean().backward()
    assert fused.weight.grad is None
    torch.testing.assert_close(fused.weight.main_grad, plain.weight.grad.float(), rtol=1e-3, atol=1e-5)
    fused_wgrad.reduce_and_publish(owned, 1)
    torch.testing.assert_close(fused.weight.grad, plain.weight.grad, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("recipe", ["current", "delayed"])
def test_trainer_with_te_trains_saves_resumes_and_samples(tmp_path, shapes_dir, recipe):
    """A stage-1 run with precision=te on the GPU: its loss tracks the bf16 run's, its checkpoints hold no
    pickled TE state, it resumes, and the plain-torch sampler loads them."""
    from safetensors.torch import load_file

    from conftest import compose, tiny_overrides
    from inference.pipeline import SampleSettings, generate, latent_shape, load_model
    from training.trainer import train

    common = {"model.preset": "demo", "train.max_steps": 60, "train.checkpoint_every": 30, "train.log_every": 10}
    bf16 = train(compose(tiny_overrides(tmp_path / "bf16", shapes_dir, **common)))
    te = train(compose(tiny_overrides(tmp_path / "te", shapes_dir, precision="te", **{"precision.te_recipe": recipe}, **common)))
    print(f"{recipe}: final loss te {te['final_loss']:.4f} vs bf16 {bf16['final_loss']:.4f}")
    assert te["step"] == 60 and abs(te["final_loss"] - bf16["final_loss"]) < 0.15 * bf16["final_loss"]
    for name in ("model.safetensors", "ema.safetensors"):
        assert not any("_extra_state" in k for k in load_file(os.path.join(te["checkpoint"], name)))
    more = train(compose(tiny_overrides(tmp_path / "te", shapes_dir, precision="te",
                                        **{"precision.te_recipe": recipe, **common, "train.max_steps": 70})))
    assert more["step"] == 70 and more["steps_this_run"] == 10  # resumed from step 60
    model, ae, meta = load_model(more["checkpoint"], device="cuda")
    assert "linear_backend" not in meta["model_config"] and not any(
        type(m).__module__.startswith("transformer_engine") for m in model.modules())
    images = generate(model.cuda(), ae.cuda(), {"class_labels": torch.arange(4, device="cuda")},
                      {"class_labels": torch.full((4,), 12, device="cuda")}, latent_shape(meta), SampleSettings(steps=4, cfg_scale=2.0),
                      torch.device("cuda"))
    assert images.shape[0] == 4 and torch.isfinite(images).all()


def _ddp_te_step(rank, world, init_file, out_dir, reduce):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from training import fused_wgrad

    sys.path.insert(0, str(ROOT))
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    model, x, w0 = _te_mlp()
    owned = fused_wgrad.enable(model)
    fused_wgrad.exclude_from_ddp(model, owned)
    ddp = DDP(model)
    _fp8_loss(ddp, x.chunk(world)[rank]).backward()
    if reduce:
        fused_wgrad.reduce_and_publish(owned, world)
    else:
        for _, p in owned:
            p.grad = p.main_grad.clone()
    torch.optim.SGD(model.parameters(), lr=1.0).step()
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items() if "extra" not in k}, out_dir / f"te_{reduce}_{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def _te_mlp():
    from models.linear import te_linear

    torch.manual_seed(0)
    model = nn.Sequential(te_linear(nn.Linear(128, 256).cuda()), nn.GELU(), te_linear(nn.Linear(256, 128).cuda()))
    x = torch.randn(64, 128, device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    return model, x, {k: v.detach().clone() for k, v in model.state_dict().items() if "extra" not in k}


def _fp8_loss(model, x):
    from models.linear import fp8_context

    with fp8_context("te", "current"):
        return (model(x) - x).square().mean()


def test_te_fused_wgrad_under_ddp_equals_one_process(tmp_path):
    """Two DDP processes (gloo, sharing the one GPU) with te.Linear and fused wgrad: with our all-reduce the
    step equals one process on the whole batch to within FP8 noise; without it the replicas drift apart."""
    import torch.multiprocessing as mp

    from training import fused_wgrad

    for reduce in (True, False):
        mp.spawn(_ddp_te_step, args=(2, str(tmp_path / f"rdzv{reduce}"), tmp_path, reduce), nprocs=2, join=True)
    model, x, w0 = _te_mlp()
    owned = fused_wgrad.enable(model)
    _fp8_loss(model, x).backward()
    fused_wgrad.reduce_and_publish(owned, 1)
    torch.optim.SGD(model.parameters(), lr=1.0).step()
    single = {k: (v.detach() - w0[k]).cpu() for k, v in model.state_dict().items() if "extra" not in k}
    for reduce, bound in ((True, 0.1), (False, None)):
        errs = []
        for rank in (0, 1):
            got = torch.load(tmp_path / f"te_{reduce}_{rank}.pt", weights_only=True)
            errs += [rel(got[k] - w0[k].cpu(), single[k]) for k in single if k.endswith("weight")]
        print(f"reduce={reduce}: update error vs one process {max(errs):.4f}")
        if reduce:
            assert max(errs) < bound
        else:
            assert max(errs) > 0.3  # each replica stepped on its own half batch
