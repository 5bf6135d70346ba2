"""What a stage conditions on: class labels (stage 1) or text (stages 2-5).

A conditioning turns a training batch into the model's condition (with dropout
to the null condition for classifier-free guidance), gives the null condition
for sampling, and the evaluation prompts. Class conditions are label tensors
(``model(x, t, y)``); text conditions are dicts of keyword arguments
(``model(x, t, encoder_hidden_states=..., encoder_attention_mask=...)``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


class ConditioningError(ValueError):
    """Data and conditioning disagree; the message says what to change."""


class ClassConditioning:
    type = "class"

    def __init__(self, num_classes: int, class_names: list[str] | None = None):
        self.num_classes, self.class_names = num_classes, class_names

    def meta(self) -> dict:
        return {"type": "class", "num_classes": self.num_classes, "class_names": self.class_names}

    def null(self, n: int, device) -> torch.Tensor:
        return torch.full((n,), self.num_classes, dtype=torch.long, device=device)

    def train_condition(self, batch: dict, gen: torch.Generator, dropout: float, device) -> torch.Tensor:
        if "label" not in batch:
            raise ConditioningError("stage conditioning is 'class' but the shards' samples have no 'label' in their metadata")
        y = batch["label"].to(device)
        drop = torch.rand(y.shape[0], generator=gen, device=device) < dropout
        return torch.where(drop, torch.full_like(y, self.num_classes), y)  # CFG: condition -> null class


def text_condition(hidden: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"encoder_hidden_states": hidden, "encoder_attention_mask": mask}


class TextConditioning:
    """Text from the shards' stored embeddings (``precomputed``) or a frozen encoder run on the
    captions (``online``). ``caption_mix`` picks a caption name per sample ({long: 0.8, short: 0.2});
    dropped samples get the empty prompt's embedding, the null condition."""

    type = "text"

    def __init__(self, data_dir: str, manifest: dict, mode: str = "precomputed", caption_mix: dict[str, float] | None = None):
        from data.text_embeddings import pad, read_null

        te = manifest.get("text_encoder")
        if not te:
            raise ConditioningError(
                f"{data_dir} has no text embeddings (its manifest's text_encoder is null). Text stages need shards "
                "prepared with a text encoder (data/prepare.py --text-encoder ..., or data/shapes.py --text-encoder ...)"
            )
        if mode not in ("precomputed", "online"):
            raise ConditioningError(f"data.text_mode={mode!r}: expected 'precomputed' or 'online'")
        self.data_dir, self.mode = data_dir, mode
        self.encoder_name, self.max_length, self.width = te["name"], int(te["max_length"]), int(te["width"])
        names = te.get("captions") or ["caption"]
        mix = {k: float(v) for k, v in (caption_mix or {names[0]: 1.0}).items() if float(v) > 0}
        unknown = sorted(set(mix) - set(names))
        if unknown or not mix:
            raise ConditioningError(f"data.caption_mix names {unknown or 'nothing'}; the shards' captions are {names}")
        total = sum(mix.values())
        self.caption_names = list(mix)
        self.caption_cdf = torch.tensor([sum(list(mix.values())[: i + 1]) / total for i in range(len(mix))])
        self.null_hidden, self.null_mask = pad([read_null(data_dir)], self.max_length)  # (1, L, D), (1, L)
        self._encoder = None

    def meta(self) -> dict:
        return {"type": "text", "text_encoder": {"name": self.encoder_name, "max_length": self.max_length, "width": self.width},
                "caption_names": self.caption_names}

    @property
    def encoder(self):
        """The frozen text encoder (loaded on first use: online training, evaluation prompts)."""
        if self._encoder is None:
            from data.text_embeddings import CachedEncoder
            from models.text_encoder import TextEncoder

            self._encoder = CachedEncoder(TextEncoder(self.encoder_name, max_length=self.max_length))
            if self._encoder.width != self.width:
                raise ConditioningError(
                    f"text encoder {self.encoder_name} has width {self._encoder.width} but the shards' embeddings have {self.width}"
                )
        return self._encoder

    def null(self, n: int, device) -> dict[str, torch.Tensor]:
        return text_condition(self.null_hidden.expand(n, -1, -1).to(device), self.null_mask.expand(n, -1).to(device))

    def encode(self, prompts: list[str], device) -> dict[str, torch.Tensor]:
        hidden, mask = self.encoder.batch(prompts)
        return text_condition(hidden.to(device), mask.to(device))

    def train_condition(self, batch: dict, gen: torch.Generator, dropout: float, device) -> dict[str, torch.Tensor]:
        n = len(batch["keys"])
        if len(self.caption_names) > 1:
            u = torch.rand(n, generator=gen, device=device)
            choice = torch.searchsorted(self.caption_cdf.to(device), u, right=True).clamp(max=len(self.caption_names) - 1)
        else:
            choice = torch.zeros(n, dtype=torch.long, device=device)
        if self.mode == "online":
            captions = [_caption(m, self.caption_names[int(c)]) for m, c in zip(batch["meta"], choice)]
            hidden, mask = self.encoder.batch(captions)
            hidden, mask = hidden.to(device), mask.to(device)
        else:
            stored = batch.get("text") or {}
            if not stored:
                raise ConditioningError(f"the shards in {self.data_dir} store no caption embeddings; they are needed for text stages")
            # a caption this batch lacks falls back to one it has (short captions may be sparse)
            pick = [k if k in stored else next(iter(stored)) for k in self.caption_names]
            hidden = torch.stack([stored[k][0] for k in pick]).to(device)  # (K, N, L, D)
            mask = torch.stack([stored[k][1] for k in pick]).to(device)
            idx = torch.arange(n, device=device)
            hidden, mask = hidden[choice, idx], mask[choice, idx]
        drop = torch.rand(n, generator=gen, device=device) < dropout
        null = self.null(n, device)
        hidden = torch.where(drop[:, None, None], null["encoder_hidden_states"], hidden)
        mask = torch.where(drop[:, None], null["encoder_attention_mask"], mask)
        return text_condition(hidden, mask)


def _caption(meta: dict, name: str) -> str:
    captions = meta.get("captions") or {"caption": meta.get("caption", "")}
    if name not in captions:
        raise ConditioningError(f"a sample has no {name!r} caption (it has {sorted(captions)})")
    return captions[name]


def make_conditioning(kind: str, data_dir: str | Path, manifest: dict, data_cfg: Any):
    if kind == "class":
        return ClassConditioning(int(data_cfg.num_classes), manifest.get("class_names"))
    if kind == "text":
        mix = data_cfg.get("caption_mix")
        return TextConditioning(str(data_dir), manifest, data_cfg.get("text_mode", "precomputed"), dict(mix) if mix else None)
    raise ConditioningError(f"stage.conditioning={kind!r}: expected 'class' or 'text'")
