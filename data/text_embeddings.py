"""Text embeddings as shards store them, and the cache that makes them cheap.

A caption's embedding is stored trimmed to its real tokens, (L_i, D) fp16, as
``<key>.text_<name>.npy`` (one per caption name: ``long``, ``short``, ...).
Tokenizers pad on the right, so the mask is implied by the length: the first
L_i tokens are real. :func:`pad` rebuilds the fixed-length (N, max_length, D)
batch and its key mask. The empty prompt's embedding (the CFG null condition)
sits beside the shards as ``null_text.npy``.

Embeddings are rounded through fp16 everywhere (stored, online, at sampling),
so a model sees the same numbers whichever way its text was encoded.
"""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

NULL_TEXT = "null_text.npy"


def trim(hidden: torch.Tensor, mask: torch.Tensor) -> list[np.ndarray]:
    """(N, L, D) hidden states + (N, L) mask -> N arrays (L_i, D) fp16 of the real tokens."""
    lengths = mask.sum(dim=1).tolist()
    return [hidden[i, : int(n)].to(torch.float16).cpu().numpy() for i, n in enumerate(lengths)]


def pad(arrays: list[np.ndarray], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """N arrays (L_i, D) -> (N, max_length, D) float32 zero-padded, (N, max_length) bool mask."""
    if not arrays:
        raise ValueError("pad() needs at least one embedding")
    width = arrays[0].shape[-1]
    out = np.zeros((len(arrays), max_length, width), dtype=np.float32)
    lengths = np.zeros(len(arrays), dtype=np.int64)
    for i, a in enumerate(arrays):
        if a.ndim != 2 or a.shape[-1] != width:
            raise ValueError(f"text embedding {i} has shape {a.shape}; expected (tokens, {width})")
        n = min(a.shape[0], max_length)
        out[i, :n] = a[:n]
        lengths[i] = n
    mask = torch.arange(max_length)[None, :] < torch.from_numpy(lengths)[:, None]
    return torch.from_numpy(out), mask


class CachedEncoder:
    """A frozen TextEncoder with an LRU cache of trimmed fp16 embeddings keyed by caption."""

    def __init__(self, encoder, capacity: int = 65536):
        self.encoder, self.capacity = encoder, capacity
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()

    @property
    def width(self) -> int:
        return self.encoder.hidden_size

    @property
    def max_length(self) -> int:
        return self.encoder.max_length

    def __call__(self, captions: list[str], batch_size: int = 256) -> list[np.ndarray]:
        missing = list(dict.fromkeys(c for c in captions if c not in self._cache))
        for i in range(0, len(missing), batch_size):
            chunk = missing[i : i + batch_size]
            for caption, emb in zip(chunk, trim(*self.encoder.encode(chunk))):
                self._cache[caption] = emb
        out = []
        for c in captions:
            self._cache.move_to_end(c)
            out.append(self._cache[c])
        while len(self._cache) > self.capacity:
            self._cache.popitem(last=False)
        return out

    def batch(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Captions -> padded (N, max_length, D), (N, max_length) mask, fp16-rounded."""
        return pad(self(captions), self.max_length)


def write_null(data_dir, embedding: np.ndarray) -> None:
    """Atomically (several preparation workers may write the same, identical file)."""
    from data.shards import _npy_bytes, atomic_write_bytes

    atomic_write_bytes(Path(data_dir) / NULL_TEXT, _npy_bytes(np.asarray(embedding, dtype=np.float16)))


def read_null(data_dir) -> np.ndarray:
    path = Path(data_dir) / NULL_TEXT
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: text shards keep the empty prompt's embedding there (the CFG null condition)")
    return np.load(path, allow_pickle=False)
