"""The precision config (``precision.*``) applied to a training run: the linear backend converted onto
the built model, and the context the forward pass runs in (bf16 autocast, TE's FP8 autocast)."""
from __future__ import annotations

import contextlib
from typing import Callable, ContextManager

import torch
import torch.nn as nn

from models.linear import convert, fp8_context
from training.config import ConfigError
from training.logger import log


def check_micro_batch(precision, micro: int, global_batch: int, world_size: int, accum: int) -> None:
    """TE's FP8 GEMMs want the rows of every input (tokens x samples; for the per-sample adaLN
    linears, samples alone) divisible by 8."""
    if precision.linear == "te" and micro % 8:
        raise ConfigError(
            f"precision.linear=te runs its GEMMs in FP8, which needs the per-rank micro-batch to be a multiple of 8, but it is "
            f"{micro} (train.global_batch_size={global_batch} / {world_size} ranks / train.grad_accum={accum}). "
            f"Use a global batch that is a multiple of {8 * world_size * accum}."
        )


def apply(model: nn.Module, precision) -> nn.Module:
    """Swap the model's linears for ``precision.linear``'s (models/linear.py ``convert``)."""
    try:
        return convert(model, precision.linear)
    except ValueError as e:
        raise ConfigError(str(e)) from e


def forward_context(precision, device: torch.device) -> Callable[[], ContextManager]:
    """A factory of the context every training forward runs in. Checks now that an FP8 recipe can
    run on this GPU, so a run stops before training, not at its first step."""
    use_autocast = autocast_enabled(precision, device)
    fp8_context(precision.linear, precision.te_recipe)

    def context() -> ContextManager:
        stack = contextlib.ExitStack()
        stack.enter_context(torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_autocast))
        stack.enter_context(fp8_context(precision.linear, precision.te_recipe))
        return stack

    return context


def autocast_enabled(precision, device: torch.device) -> bool:
    """bf16 autocast for the training forward: on GPU with ``autocast: bf16``; on CPU only when
    ``autocast_cpu`` is also set, since it pays only where the CPU multiplies bf16 natively
    (AVX512-BF16 or AMX; elsewhere bf16 matmuls are emulated and slower than fp32)."""
    if precision.autocast not in ("bf16", "none"):
        raise ConfigError(f"precision.autocast={precision.autocast!r}: expected 'bf16' or 'none'")
    if precision.autocast != "bf16":
        return False
    if device.type != "cpu":
        return True
    if not precision.get("autocast_cpu", False):
        return False
    if not cpu_has_native_bf16():
        log.warning("precision.autocast_cpu: this CPU has no native bf16 (AVX512-BF16 / AMX); bf16 matmuls are emulated and "
                    "likely slower than fp32. Set precision.autocast_cpu=false to train in fp32.")
    return True


def cpu_has_native_bf16() -> bool:
    """x86 AVX512-BF16 or AMX-BF16 (what PyTorch's CPU capability probe reports; False where it can't tell)."""
    caps = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    return bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))
