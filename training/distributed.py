"""torchrun / DDP plumbing: one process per device, gloo on CPU, nccl on GPU."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup() -> DistInfo:
    """Initialize the process group when launched by torchrun (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistInfo(rank, world, local, device)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def cleanup(info: DistInfo) -> None:
    # barrier first: tearing down gloo while a peer is still in a collective aborts it
    if info.enabled and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def all_reduce_mean(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        value = value.clone()
        dist.all_reduce(value)
        value /= info.world_size
    return value


@torch.no_grad()
def average_in_place(tensors: list[torch.Tensor], world_size: int) -> None:
    """Each tensor replaced by its mean over the ranks, in one all-reduce of them all (a no-op on one rank)."""
    if world_size <= 1 or not tensors:
        return
    flat = torch.cat([t.flatten() for t in tensors])
    dist.all_reduce(flat)
    flat /= world_size
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


def replica_divergence(model: torch.nn.Module, info: DistInfo) -> float:
    """Largest difference of any parameter across ranks (0.0 when replicas are identical)."""
    if not info.enabled:
        return 0.0
    flat = torch.cat([p.detach().float().flatten() for p in model.parameters()])
    hi, lo = flat.clone(), flat.clone()
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    return (hi - lo).max().item()


def shared_items(items: list[str], info: DistInfo) -> int:
    """How many of this rank's items another rank also has (sample keys: must be 0)."""
    if not info.enabled:
        return 0
    gathered: list = [None] * info.world_size
    dist.all_gather_object(gathered, list(items))
    others = {x for r, keys in enumerate(gathered) if r != info.rank for x in keys}
    overlap = torch.tensor(float(len(set(items) & others)))
    dist.all_reduce(overlap)
    return int(overlap.item())
