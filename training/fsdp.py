"""FSDP2 (``torch.distributed.fsdp.fully_shard``) as an alternative to DDP: ``train.parallel=fsdp``.

Each transformer block and then the whole model are sharded over all ranks; the EMA copy is
sharded the same way, so its update stays a local operation on each shard. Checkpoints stay
the single-file format every other tool reads: full state dicts gathered onto rank 0 (CPU),
so an FSDP run's checkpoint loads into the one-process sampler, app and reparameterize.py.
The optimizer state is saved as a full, name-keyed state dict; resume with the same
``train.parallel``.
"""
from __future__ import annotations

import torch
import torch.nn as nn


def shard(model: nn.Module, ema: nn.Module, device: torch.device, world_size: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world_size,))
    for m in (model, ema):
        for block in m.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(m, mesh=mesh)


def _options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """Collective: every rank calls it; rank 0 gets the whole state dict on CPU."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(module, options=_options())


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=_options())


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, optim_state_dict=state, options=StateDictOptions(full_state_dict=True))


def scalar(x) -> float:
    """A float from a tensor that may be a DTensor (e.g. FSDP's gradient norm)."""
    return float(x.full_tensor() if hasattr(x, "full_tensor") else x)
