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
