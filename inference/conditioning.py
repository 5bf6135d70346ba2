"""What a model is conditioned on: one object for training, the sampler, the app and the evaluator.

A conditioning is built from a checkpoint's meta (``from_meta``) or, by the trainer, from the
shards' manifest; it writes that meta back (``meta``), so the two are the same thing. It
turns what a user types (a class name or id, a prompt) into the model's condition, gives the
null condition classifier-free guidance needs, and turns a training batch into conditions with
dropout to the null. A condition is always a dict of the model's keyword arguments:
``{"class_labels": (N,)}`` for ccDiT, ``{"encoder_hidden_states": (N, L, D),
"encoder_attention_mask": (N, L)}`` for mmDiT, so every caller runs ``model(x, t, **cond)``.

A new kind of condition (a control image, say) is one more class here and one line in ``KINDS``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


class ConditioningError(ValueError):
    """Data, checkpoint or user input and the conditioning disagree; the message says what to change."""


class Conditioning:
    """The interface; see the two kinds below."""

    kind: str  # the name in configs (stage.conditioning) and in checkpoint meta
    family: str  # the model family that takes it
    accuracy_name: str  # what the evaluator's all-attributes-right score is called for this kind

    def meta(self) -> dict:
        raise NotImplementedError

    def parse(self, inputs: list[str]) -> list:
        """What a user typed -> the values ``encode`` takes; ConditioningError saying what is expected."""
        raise NotImplementedError

    def default_inputs(self) -> list:
        """The values to sample when the user names none (every class; a text checkpoint's examples)."""
        raise NotImplementedError

    def describe(self, value) -> str:
        """A value in words (a class name, the prompt itself): what an evaluator checks an image against."""
        raise NotImplementedError

    def encode(self, values: list, device) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def null(self, n: int, device) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def guided(self, values: list, device, negative: str | None = None) -> tuple[dict, dict]:
        """(cond, uncond) for classifier-free guidance; ``negative`` replaces the null condition where the kind has one."""
        return self.encode(values, device), self.null(len(values), device)

    def from_batch(self, batch: dict, gen: torch.Generator, dropout: float, device) -> dict[str, torch.Tensor]:
        """A training batch's conditions, each replaced by the null one with probability ``dropout`` (CFG)."""
        raise NotImplementedError

    def stored_captions(self) -> list[str]:
        """The caption embeddings training reads from the shards (the loader decodes only these)."""
        return []

    def stored_control(self) -> str | None:
        """The control map training reads from the shards (ControlNet), or None."""
        return None

    def bind(self, autoencoder) -> "Conditioning":
        """Give the conditioning the images' autoencoder, for kinds that encode an image (a control image)."""
        return self

    def agreement(self, images: torch.Tensor, values: list) -> dict[str, float]:
        """Scores of how well generated images (N, 3, H, W) in [-1, 1] follow a spatial condition
        (a control image); none for labels and text."""
        return {}


class ClassConditioning(Conditioning):
    """Class labels 0..K-1; label K is the null class."""

    kind, family, accuracy_name = "class", "ccdit", "class_accuracy"

    def __init__(self, num_classes: int, class_names: list[str] | None = None):
        self.num_classes, self.class_names = int(num_classes), (list(class_names) if class_names else None)

    @classmethod
    def from_meta(cls, meta: dict) -> "ClassConditioning":
        return cls(meta["num_classes"], meta.get("class_names"))

    def meta(self) -> dict:
        return {"type": "class", "num_classes": self.num_classes, "class_names": self.class_names}

    def choices(self) -> list[str]:
        return self.class_names or [str(i) for i in range(self.num_classes)]

    def parse(self, inputs: list[str]) -> list[int]:
        if [str(s) for s in inputs] == ["all"]:
            return self.default_inputs()
        return [self._label(str(s)) for s in inputs]

    def _label(self, raw: str) -> int:
        raw = raw.strip()
        names = self.class_names or []
        for name in (raw, raw.replace("_", " ")):  # a class name first: names may contain underscores or be digits
            if name in names:
                return names.index(name)
        if raw.isdigit() and int(raw) < self.num_classes:
            return int(raw)
        example = f" or names like {names[0].replace(' ', '_')!r}" if names else ""
        raise ConditioningError(f"unknown class {raw!r}: this class-conditional checkpoint takes ids 0..{self.num_classes - 1}{example}")

    def default_inputs(self) -> list[int]:
        return list(range(self.num_classes))

    def describe(self, value: int) -> str:
        return self.class_names[value] if self.class_names else str(value)

    def encode(self, values: list[int], device) -> dict[str, torch.Tensor]:
        return {"class_labels": torch.as_tensor(values, dtype=torch.long, device=device)}

    def null(self, n: int, device) -> dict[str, torch.Tensor]:
        return {"class_labels": torch.full((n,), self.num_classes, dtype=torch.long, device=device)}

    def from_batch(self, batch: dict, gen: torch.Generator, dropout: float, device) -> dict[str, torch.Tensor]:
        if "label" not in batch:
            raise ConditioningError("stage conditioning is 'class' but the shards' samples have no 'label' in their metadata")
        y = batch["label"].to(device)
        drop = torch.rand(y.shape[0], generator=gen, device=device) < dropout
        return {"class_labels": torch.where(drop, torch.full_like(y, self.num_classes), y)}


_ENCODERS: dict = {}


def text_encoder(name: str, max_length: int, width: int):
    """The frozen encoder ``name`` (cached per process), checked to give embeddings of ``width``."""
    key = (name, max_length)
    if key not in _ENCODERS:
        from models.text_encoder import CachedEncoder, TextEncoder

        enc = CachedEncoder(TextEncoder(name, max_length=max_length))
        if enc.width != width:
            raise ConditioningError(f"text encoder {name} gives embeddings of width {enc.width}, but the model was trained on width {width}")
        _ENCODERS[key] = enc
    return _ENCODERS[key]


class TextConditioning(Conditioning):
    """Text through a frozen encoder, the empty prompt as the null condition.

    For training, the captions' embeddings come from the shards (``mode="precomputed"``) or from
    the encoder run on the captions (``online``); ``caption_mix`` picks a caption name per sample
    ({long: 0.8, short: 0.2}); ``null_embedding`` is the empty prompt's stored embedding. For
    sampling, the empty prompt (or a negative prompt) is encoded with the prompts.
    """

    kind, family, accuracy_name = "text", "mmdit", "caption_accuracy"

    def __init__(self, encoder: str, max_length: int, width: int, caption_names: list[str] | None = None,
                 caption_mix: dict[str, float] | None = None, mode: str = "sampling", null_embedding: np.ndarray | None = None,
                 examples: list[str] | None = None):
        self.encoder_name, self.max_length, self.width, self.mode = encoder, int(max_length), int(width), mode
        names = caption_names or ["caption"]
        mix = {k: float(v) for k, v in (caption_mix or {names[0]: 1.0}).items() if float(v) > 0}
        unknown = sorted(set(mix) - set(names))
        if unknown or not mix:
            raise ConditioningError(f"data.caption_mix names {unknown or 'nothing'}; the shards' captions are {names}")
        total = sum(mix.values())
        self.caption_names = list(mix)
        self.caption_cdf = torch.tensor([sum(list(mix.values())[: i + 1]) / total for i in range(len(mix))])
        self.examples = list(examples or [])
        self.null_hidden = self.null_mask = None
        if null_embedding is not None:
            from models.text_encoder import pad

            self.null_hidden, self.null_mask = pad([null_embedding], self.max_length)  # (1, L, D), (1, L)

    @classmethod
    def from_meta(cls, meta: dict) -> "TextConditioning":
        te = meta.get("text_encoder")
        if not te:  # a stage-2 init from reparameterize.py: the encoder is chosen by the data it trains on
            raise ConditioningError("this checkpoint names no text encoder (a stage-2 init made by reparameterize.py): "
                                    "it takes prompts once stage 2 has trained it; sample the stage-2 run instead")
        return cls(te["name"], te["max_length"], te["width"], meta.get("caption_names"), examples=meta.get("examples"))

    @classmethod
    def for_training(cls, data_dir: str, manifest: dict, mode: str, caption_mix: dict | None,
                     examples: list[str] | None = None) -> "TextConditioning":
        from data.shards import read_null

        te = manifest.get("text_encoder")
        if not te:
            raise ConditioningError(
                f"{data_dir} has no text embeddings (its manifest's text_encoder is null). Text stages need shards "
                "prepared with a text encoder (data/prepare.py --text-encoder ..., or data/shapes.py --text-encoder ...)"
            )
        if mode not in ("precomputed", "online"):
            raise ConditioningError(f"data.text_mode={mode!r}: expected 'precomputed' or 'online'")
        return cls(te["name"], te["max_length"], te["width"], te.get("captions") or ["caption"], caption_mix, mode,
                   read_null(data_dir), examples)

    def meta(self) -> dict:
        meta = {"type": "text", "text_encoder": {"name": self.encoder_name, "max_length": self.max_length, "width": self.width},
                "caption_names": self.caption_names}
        return {**meta, "examples": self.examples} if self.examples else meta

    @property
    def encoder(self):
        """The frozen text encoder (loaded on first use)."""
        return text_encoder(self.encoder_name, self.max_length, self.width)

    def choices(self) -> None:
        return None  # free text

    def parse(self, inputs: list[str]) -> list[str]:
        return [str(p) for p in inputs]

    def default_inputs(self) -> list[str]:
        if not self.examples:
            raise ConditioningError("this checkpoint is text-conditioned: give prompts")
        return list(self.examples)

    def describe(self, value: str) -> str:
        return value

    def stored_captions(self) -> list[str]:
        return self.caption_names if self.mode == "precomputed" else []

    def encode(self, values: list[str], device) -> dict[str, torch.Tensor]:
        hidden, mask = self.encoder.batch(list(values))
        return _text(hidden.to(device), mask.to(device))

    def null(self, n: int, device) -> dict[str, torch.Tensor]:
        if self.null_hidden is None:
            return self._expand(self.encode([""], device), n)
        return _text(self.null_hidden.expand(n, -1, -1).to(device), self.null_mask.expand(n, -1).to(device))

    def guided(self, values: list[str], device, negative: str | None = None) -> tuple[dict, dict]:
        if negative is None and self.null_hidden is not None:  # training: the stored null condition
            return super().guided(values, device)
        # prompts and the negative (default: the empty prompt, the null condition) in one encoder call
        both = self.encode(list(values) + [negative or ""], device)
        n = len(values)
        return {k: v[:n] for k, v in both.items()}, self._expand({k: v[n:] for k, v in both.items()}, n)

    @staticmethod
    def _expand(cond: dict[str, torch.Tensor], n: int) -> dict[str, torch.Tensor]:
        return {k: v.expand(n, *v.shape[1:]) for k, v in cond.items()}

    def from_batch(self, batch: dict, gen: torch.Generator, dropout: float, device) -> dict[str, torch.Tensor]:
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
                raise ConditioningError("the shards store no caption embeddings; text stages need them (or data.text_mode=online)")
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
        return _text(hidden, mask)


def _text(hidden: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"encoder_hidden_states": hidden, "encoder_attention_mask": mask}


def _caption(meta: dict, name: str) -> str:
    captions = meta.get("captions") or {"caption": meta.get("caption", "")}
    if name not in captions:
        raise ConditioningError(f"a sample has no {name!r} caption (it has {sorted(captions)})")
    return captions[name]


@dataclass
class ControlPrompt:
    """A ControlNet's input: a prompt and its control image, (3, H, W) in [-1, 1] (data/control.py ``to_pixels``)."""

    prompt: str
    control: torch.Tensor

    def __str__(self) -> str:
        return self.prompt


class ControlConditioning(TextConditioning):
    """Text plus a control image (ControlNet, models/mmdit.py ``ControlNet``): a control map of the
    checkpoint's kind (data/control.py: edges, mask) as (N, 3, H, W) pixels in [-1, 1], through
    the images' autoencoder and normalized like the latents, into the model's ``control`` argument.
    The null condition of classifier-free guidance keeps the control (only the text is dropped),
    as ControlNet samples; training reads the map the shards store beside each image."""

    kind, family, accuracy_name = "control", "mmdit", "caption_accuracy"

    def __init__(self, *args, control_kind: str = "mask", **kwargs):
        super().__init__(*args, **kwargs)
        from data.control import ControlError, check_kind

        try:
            self.control_kind = check_kind(control_kind)
        except ControlError as e:
            raise ConditioningError(str(e)) from None
        self.autoencoder = None  # the images' (``bind``): control images are encoded and normalized like them
        self.eval_values: list[ControlPrompt] = []  # training: the data's own prompts with their control images

    @classmethod
    def from_meta(cls, meta: dict) -> "ControlConditioning":
        text = TextConditioning.from_meta(meta)
        control = meta.get("control") or {}
        return cls(text.encoder_name, text.max_length, text.width, text.caption_names, examples=text.examples,
                   control_kind=control.get("kind", "mask"))

    @classmethod
    def for_training(cls, data_dir: str, manifest: dict, mode: str, caption_mix: dict | None, examples: list[str] | None = None,
                     control_kind: str | None = None) -> "ControlConditioning":
        stored = list(manifest.get("controls") or [])
        if not control_kind or control_kind not in stored:
            raise ConditioningError(
                f"stage conditioning 'control' trains on the control map data.control={control_kind!r}, but {data_dir} stores "
                + (f"{stored}: set data.control to one of them" if stored else
                   "none: prepare the data with control maps (python -m data.prepare ... --control edges mask)"))
        out = super().for_training(data_dir, manifest, mode, caption_mix, examples)
        out.control_kind = control_kind
        return out

    def meta(self) -> dict:
        return {**super().meta(), "type": "control", "control": {"kind": self.control_kind}}

    def stored_control(self) -> str:
        return self.control_kind

    def bind(self, autoencoder) -> "ControlConditioning":
        self.autoencoder = autoencoder
        return self

    def parse(self, inputs: list) -> list[ControlPrompt]:
        if not all(isinstance(v, ControlPrompt) for v in inputs):
            raise ConditioningError(f"this checkpoint is a ControlNet ({self.control_kind} maps): each prompt needs a control "
                                    "image (app/sample.py --control PATH, or the app's control image)")
        return list(inputs)

    def default_inputs(self) -> list[ControlPrompt]:
        if not self.eval_values:
            raise ConditioningError("this checkpoint is a ControlNet: give prompts and a control image")
        return list(self.eval_values)

    def describe(self, value: ControlPrompt) -> str:
        return value.prompt

    def control_image(self, image, height: int, width: int, derive: bool = False) -> torch.Tensor:
        """A user's picture (PIL image or (H, W[, 3]) uint8 array) -> the (3, height, width) control pixels: scaled
        to cover the output and center-cropped, as data preparation crops. ``derive``: the picture is an ordinary
        image and this checkpoint's map (edges, mask) is derived from it; else it is the map itself (its grey level)."""
        from PIL import Image

        from data.control import control_map, from_image, to_pixels

        img = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, dtype=np.uint8))
        img = img.convert("RGB")
        scale = max(width / img.width, height / img.height)
        rw, rh = max(width, round(img.width * scale)), max(height, round(img.height * scale))
        img = img.resize((rw, rh), Image.BICUBIC if derive else Image.NEAREST)  # a map keeps its hard edges
        left, top = (rw - width) // 2, (rh - height) // 2
        pixels = np.asarray(img.crop((left, top, left + width, top + height)))
        grey = control_map(self.control_kind, pixels) if derive else from_image(pixels)
        return torch.from_numpy(to_pixels(grey))

    def control_latents(self, pixels: torch.Tensor, device) -> torch.Tensor:
        """(N, 3, H, W) control images in [-1, 1] -> the model's ``control``: the images' autoencoder, normalized."""
        with torch.no_grad():
            return self.normalize(self.autoencoder.encode(pixels.to(device)).float())

    def encode(self, values: list, device) -> dict[str, torch.Tensor]:
        if all(isinstance(v, str) for v in values):  # the prompts alone (the text half of guided)
            return super().encode(values, device)
        text = super().encode([v.prompt for v in values], device)
        return {**text, "control": self.control_latents(torch.stack([v.control for v in values]), device)}

    def guided(self, values: list, device, negative: str | None = None) -> tuple[dict, dict]:
        """The text's (cond, uncond); both halves see the control image: guidance pushes toward the prompt only."""
        cond, uncond = super().guided([v.prompt for v in values], device, negative)
        control = self.control_latents(torch.stack([v.control for v in values]), device)
        return {**cond, "control": control}, {**uncond, "control": control}

    def agreement(self, images: torch.Tensor, values: list) -> dict[str, float]:
        """``mask`` controls: the mean IoU of each image's foreground (data/control.py ``mask``) with its control."""
        if self.control_kind != "mask":
            return {}
        from data.control import mask, mask_iou

        pixels = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        wanted = [((v.control[0].float().cpu().numpy() + 1) / 2) for v in values]
        return {"control_iou": float(np.mean([mask_iou(mask(p), w) for p, w in zip(pixels, wanted)]))}

    def normalize(self, raw: torch.Tensor) -> torch.Tensor:
        """Autoencoder latents (as the shards store them) -> what the model reads, as the trainer does the images'."""
        if self.autoencoder is None:
            raise RuntimeError("ControlConditioning.bind(autoencoder) first: control images are encoded and normalized like the images")
        return self.autoencoder.normalize(raw)

    def from_batch(self, batch: dict, gen: torch.Generator, dropout: float, device) -> dict[str, torch.Tensor]:
        cond = super().from_batch(batch, gen, dropout, device)
        stored = batch.get("control") or {}
        if self.control_kind not in stored:
            raise ConditioningError(f"a batch has no {self.control_kind!r} control map; the shards store {sorted(stored)}")
        return {**cond, "control": self.normalize(stored[self.control_kind].to(device))}


KINDS: dict[str, type[Conditioning]] = {"class": ClassConditioning, "text": TextConditioning, "control": ControlConditioning}


def kind_of(name: str) -> type[Conditioning]:
    if name not in KINDS:
        raise ConditioningError(f"conditioning {name!r}: expected one of {sorted(KINDS)}")
    return KINDS[name]


def from_meta(meta: dict) -> Conditioning:
    """The conditioning a checkpoint's meta describes (``meta["conditioning"]``)."""
    cond = meta["conditioning"]
    return kind_of(cond["type"]).from_meta(cond)
