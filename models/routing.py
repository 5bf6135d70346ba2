"""Token routing (TREAD, Krause et al. 2025): during training a random part of the image tokens skips
a span of middle blocks and is put back, unchanged, in its place before the blocks after the span.

The routed tokens cost nothing in the span (fewer tokens through attention and MLP), no parameter is
added, and every parameter still gets a gradient from the kept tokens. Sampling never routes: the
model is called without route scores and sees all tokens in every block. Positions are added before
the first block, so a kept token carries its own position through the span; QK-norm acts per
token, and the text (its mask, its stream in joint blocks) is untouched.

Deferred masking (MicroDiT, Sehwag et al. 2024; ``mask=True``) is the same cut without the way
back: the first ``start`` blocks mix all tokens (the patch mixer), then the dropped tokens leave for
good; the blocks after and the final layer see only the kept ones, the output is zero at the dropped
tokens, and the loss counts the kept tokens only (``kept_mask``; training/step.py).

The randomness is the caller's: ``route_scores`` (N, T) uniform numbers drawn from the training
step's seeded stream (training/step.py), so a resumed run routes exactly the tokens an
uninterrupted one would. The tokens with the lowest scores are kept.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Routing:
    """ratio (`float`): fraction of the image tokens that skip blocks ``start`` .. ``end - 1``
    (0 < ratio < 1); start (`int`): the first block that sees only the kept tokens; end (`int`): the
    first block after the span, which sees all tokens again (``end`` = depth: they are put back
    before the final layer); mask (`bool`): deferred masking, the skipped tokens never come back
    (``end`` must be depth) and the loss counts only the kept ones."""

    ratio: float
    start: int
    end: int
    mask: bool = False

    def check(self, depth: int) -> "Routing":
        if not 0.0 < self.ratio < 1.0:
            raise ValueError(f"routing ratio {self.ratio}: the fraction of tokens routed past the span, 0 < ratio < 1")
        if not 0 <= self.start < self.end <= depth:
            raise ValueError(f"routing span blocks {self.start}..{self.end - 1} (start={self.start}, end={self.end}): "
                             f"need 0 <= start < end <= depth ({depth})")
        if self.mask and self.end != depth:
            raise ValueError(f"masking drops the skipped tokens for good, so it runs to the end: end={self.end} must be "
                             f"the depth ({depth}) or unset")
        return self

    def kept_count(self, tokens: int) -> int:
        """Tokens that go through the span: at least one."""
        return max(1, tokens - round(self.ratio * tokens))

    def kept(self, scores: torch.Tensor) -> torch.Tensor:
        """(N, T) scores -> (N, K) indices of the kept tokens (the K lowest scores), in token order."""
        k = self.kept_count(scores.shape[1])
        return scores.argsort(dim=1)[:, :k].sort(dim=1).values

    def kept_mask(self, scores: torch.Tensor) -> torch.Tensor:
        """(N, T) scores -> (N, T) bool, True at the kept tokens."""
        return torch.zeros(scores.shape, dtype=torch.bool, device=scores.device).scatter_(1, self.kept(scores), True)


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(N, T, D), (N, K) -> (N, K, D): the kept tokens."""
    return x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))


def scatter_tokens(full: torch.Tensor, kept: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Put the span's output for the kept tokens back in their places in ``full`` (N, T, D), the
    tokens as they entered the span; out of place, so autograd sees both paths."""
    return full.scatter(1, index[..., None].expand(-1, -1, full.shape[-1]), kept)


class RoutedSpan:
    """One forward's routing: ``enter(i, x)`` before block i, ``leave(x)`` after the last block,
    ``output(y)`` on the final layer's output (masking: back to every token, zero where dropped).
    Without scores (sampling, or routing off) all three return their input untouched."""

    def __init__(self, routing: Routing | None, scores: torch.Tensor | None, tokens: int, training: bool):
        self.active = routing is not None and scores is not None and training
        if scores is not None and scores.shape[1] != tokens:
            raise ValueError(f"route scores for {scores.shape[1]} tokens, but the image has {tokens}")
        self.routing, self.tokens = routing, tokens
        self.index = routing.kept(scores) if self.active else None
        self.full: torch.Tensor | None = None

    def enter(self, i: int, x: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return x
        if i == self.routing.start:
            if not self.routing.mask:  # masking never puts the tokens back
                self.full = x
            return gather_tokens(x, self.index)
        if i == self.routing.end:
            return self.leave(x)
        return x

    def leave(self, x: torch.Tensor) -> torch.Tensor:
        if self.full is None:
            return x
        x, self.full = scatter_tokens(self.full, x, self.index), None
        return x

    def output(self, y: torch.Tensor) -> torch.Tensor:
        """(N, K, E) final-layer output of a masked forward -> (N, T, E), zero at the dropped tokens."""
        if not (self.active and self.routing.mask):
            return y
        return scatter_tokens(y.new_zeros(y.shape[0], self.tokens, y.shape[2]), y, self.index)
