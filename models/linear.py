"""The linear-layer factory: the one place a model's matmul precision is decided.

Model files never construct ``nn.Linear`` for their heavy projections themselves;
they call :func:`make_linear` with the backend named by ``precision.linear``:

- ``torch``: plain ``nn.Linear`` (bf16 autocast on GPU is the trainer's business).
- ``mxfp8_emulated`` / ``te``: the FP8 backends (see the precision issue); asking
  for one that is not available is an error at construction, never a silent
  fallback to ``torch``.

Layers that must stay in high precision (embedders, the final projection) are
built with ``nn.Linear`` directly and named in the model class's
``_keep_in_high_precision`` tuple.
"""
from __future__ import annotations

import torch.nn as nn

BACKENDS = ("torch", "mxfp8_emulated", "te")


def make_linear(in_features: int, out_features: int, bias: bool = True, backend: str = "torch") -> nn.Module:
    """Build a linear layer ``(..., in_features) -> (..., out_features)`` for ``backend``."""
    if backend == "torch":
        return nn.Linear(in_features, out_features, bias=bias)
    if backend in BACKENDS:
        raise NotImplementedError(
            f"precision.linear={backend!r} is not implemented in this build; "
            "use precision.linear=torch"
        )
    raise ValueError(f"unknown linear backend {backend!r}; expected one of {BACKENDS}")
