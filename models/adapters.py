"""LoRA adapters on a built model, with peft (the field's adapter library).

Adapters attach after construction, as the precision converter does: ``add_lora`` wraps the
matching ``nn.Linear`` layers with peft's LoRA layers in place, freezing everything else. A
checkpoint of an adapter run stores only the adapter tensors (peft's names, without the adapter
name) and, in its meta, the adapter settings plus the base checkpoint it was trained on and the
sha256 of that base's weight file: models/checkpoint.py ``adapter_checkpoint_model`` rebuilds
base + adapters and refuses a base that changed. ``merge`` folds the adapters into the base linears (a plain model).
``peft_folder`` writes a PEFT adapter folder for diffusers' ``PixArtTransformer2DModel``.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

# Our mmDiT's linear layers by their last name: every attention projection (self and cross) and the MLP.
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out", "fc1", "fc2")


@dataclass
class LoraSpec:
    """rank (`int`, 0 = no adapters), alpha (`float`; None = rank, a scale of 1), dropout (`float`),
    target_modules (names of the linear layers to adapt: the last part of their module name)."""

    rank: int = 0
    alpha: float | None = None
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))

    @classmethod
    def from_config(cls, node) -> "LoraSpec":
        """From ``train.lora``, or from an adapter checkpoint's ``meta["adapter"]`` (the same keys)."""
        if node is None:
            return cls()
        d = dict(node)
        return cls(int(d.get("rank") or 0), d.get("alpha"), float(d.get("dropout") or 0.0),
                   list(d.get("target_modules") or DEFAULT_TARGETS))

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    def peft_config(self, target_modules=None):
        from peft import LoraConfig

        return LoraConfig(r=self.rank, lora_alpha=self.alpha if self.alpha is not None else self.rank, lora_dropout=self.dropout,
                          target_modules=list(target_modules or self.target_modules), init_lora_weights=True)

    def to_meta(self) -> dict:
        return asdict(self)


class AdapterError(ValueError):
    """Adapters that do not fit the model or their base."""


def add_lora(model: nn.Module, spec: LoraSpec) -> nn.Module:
    """Wrap ``spec.target_modules`` with LoRA (B = 0: the function is unchanged) and freeze the rest, in place."""
    from peft import inject_adapter_in_model

    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    unknown = [t for t in spec.target_modules if not any(n == t or n.endswith("." + t) for n in linears)]
    if unknown:  # peft's rule: a target is a module name's last part(s) (``to_k``, or ``cross_attn.to_k`` for one kind)
        raise AdapterError(f"train.lora.target_modules: {unknown} match no linear layer of this model; its linear layers end in "
                           f"{sorted({n.rsplit('.', 1)[-1] for n in linears})} (qualify with the parent, e.g. cross_attn.to_k)")
    model = inject_adapter_in_model(spec.peft_config(), model)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    return model


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors under peft's saved names (``...to_q.lora_A.weight``)."""
    from peft import get_peft_model_state_dict

    return {k: v.detach() for k, v in get_peft_model_state_dict(getattr(model, "module", model)).items()}


def load_adapter_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load adapter tensors; every adapter of the model must be given, and nothing else."""
    from peft import set_peft_model_state_dict

    want = set(adapter_state(model))
    if set(state) != want:
        raise AdapterError(f"adapter weights do not fit: missing {sorted(want - set(state))[:6]}, "
                           f"unexpected {sorted(set(state) - want)[:6]}")
    set_peft_model_state_dict(model, state)


def adapter_fraction(model: nn.Module) -> tuple[int, int]:
    """(adapter parameters, base parameters)."""
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    return lora, sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)


def _unwrap(model: nn.Module, fold: bool) -> nn.Module:
    """Replace every LoRA layer by its base linear, in place; ``fold``: merge the adapters into it first."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            if fold:
                module.merge()
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, module.get_base_layer())
    for attr in ("peft_config", "_hf_peft_config_loaded"):
        if hasattr(model, attr):
            delattr(model, attr)
    return model


@torch.no_grad()
def merge(model: nn.Module) -> nn.Module:
    """Fold every LoRA layer into its base linear (W + scale * B A) and unwrap it: a plain model."""
    return _unwrap(model, fold=True)


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------- PEFT folder for diffusers
def diffusers_targets(model: nn.Module) -> list[str]:
    """The diffusers module names of every adapted layer (full names: peft matches them exactly)."""
    from peft.tuners.lora import LoraLayer

    from models.diffusers_pixart import _RULES, _rename

    names = [name for name, m in model.named_modules() if isinstance(m, LoraLayer)]
    return sorted(next(iter(_rename({n + ".weight": None}, _RULES)))[: -len(".weight")] for n in names)


def peft_folder(model: nn.Module, spec: LoraSpec, out: str | os.PathLike) -> Path:
    """Write the adapters as a PEFT folder (adapter_config.json + adapter_model.safetensors) that
    ``PeftModel.from_pretrained(PixArtTransformer2DModel, out)`` loads: peft itself writes it, from a
    diffusers twin of the base carrying the same adapter tensors under diffusers' names."""
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    from models.diffusers_pixart import _RULES, _rename, to_diffusers

    base = to_diffusers(merge_copy_base(model))
    twin = get_peft_model(base, spec.peft_config(diffusers_targets(model)))
    ours = adapter_state(model)
    renamed = {}
    for name, tensor in ours.items():
        layer, _, tail = name.partition(".lora_")  # "blocks.0.attn.to_q", "A.weight"
        target = next(iter(_rename({layer + ".weight": tensor}, _RULES)))[: -len(".weight")]
        renamed[f"{target}.lora_{tail}"] = tensor
    expected = {k.removeprefix("base_model.model."): k for k in get_peft_model_state_dict(twin)}
    if set(expected) != set(renamed):
        raise AdapterError(f"adapter tensors without a diffusers counterpart: {sorted(set(renamed) ^ set(expected))[:6]}")
    set_peft_model_state_dict(twin, {expected[k]: v for k, v in renamed.items()})
    out = Path(out)
    twin.save_pretrained(out)
    config = json.loads((out / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = None  # the base is the exported transformer, not a hub id
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return out


def merge_copy_base(model: nn.Module) -> nn.Module:
    """A plain copy of the base under the adapters (the adapters left out)."""
    import copy

    return _unwrap(copy.deepcopy(model), fold=False)
