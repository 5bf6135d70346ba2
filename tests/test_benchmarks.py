"""The benchmark scripts' own measuring code, at tiny sizes (the benchmarks themselves are not
run here: tests never time things)."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import scripts.bench_vs_diffusers as bench

TINY = dict(depth=2, hidden_size=64, num_heads=2, input_size=8, in_channels=4, caption_channels=32, patch_size=2)


@pytest.fixture
def tiny_bench(monkeypatch):
    monkeypatch.setattr(bench, "CFG", TINY)
    monkeypatch.setattr(bench, "BATCH", 2)
    monkeypatch.setattr(bench, "TOKENS", 8)
    return bench


def test_kernel_floor_replays_every_flop_of_the_step(tiny_bench):
    """The floor is one training step's matrix products, convolutions and attention kernels:
    replayed, they count the step's FLOPs exactly (torch's FLOP counter, which counts addmm as
    mm), and the attention kernels once per block each way."""
    ours, _ = tiny_bench.build()
    step_flops = tiny_bench.model_flops(ours)
    floor = tiny_bench.kernel_floor(ours)
    with FlopCounterMode(display=False) as fc:
        floor()
    assert step_flops > 0 and fc.get_total_flops() == step_flops
    blocks = TINY["depth"]
    assert floor.counts["_scaled_dot_product_flash_attention_for_cpu"] == 2 * blocks  # self- and cross-attention
    assert floor.counts["_scaled_dot_product_flash_attention_for_cpu_backward"] == 2 * blocks
    # it also steps AdamW: on its own copy of the parameters, leaving the model's alone
    copies = [p for group in floor.optimizer.param_groups for p in group["params"]]
    assert len(copies) == len(list(ours.parameters()))
    before, copies_before = [p.detach().clone() for p in ours.parameters()], [p.detach().clone() for p in copies]
    floor()
    assert all(torch.equal(a, p) for a, p in zip(before, ours.parameters()))
    assert all(p.grad is None for p in ours.parameters())
    assert all(not torch.equal(a, p) for a, p in zip(copies_before, copies))


def test_both_arms_run_the_trainers_step_on_the_same_model(tiny_bench):
    """Ours and diffusers' model go through the same train_step: with the same weights and the same draws
    their losses agree, and each step moves the weights."""
    ours, theirs = tiny_bench.build()
    so, st = tiny_bench.step_fns(ours, theirs)
    before = [p.detach().clone() for p in ours.parameters()]
    losses = []
    for step in (so, st):
        torch.manual_seed(7)  # the same timesteps and noise for both
        losses.append(step().losses[0][0].item())
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(a, p) for a, p in zip(before, ours.parameters()))
