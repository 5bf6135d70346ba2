"""FID and KID (and CLIP score, given a CLIP model) of generated images against a pinned set of real ones.

The numbers come from torchmetrics (``FrechetInceptionDistance``, ``KernelInceptionDistance``,
``CLIPScore``); this module pins everything around them that changes an FID without changing the
code that computes it, and records it (:meth:`FIDEvaluator.describe`, returned with every score as
``fid_setup``):
- the reference set: the first ``max_reference`` samples of a shard folder (data/shards.py) or an
  image folder, in sorted key order, with a sha256 of the chosen keys;
- the conversion to what Inception reads: images in [-1, 1] -> uint8 ``round((x + 1) * 127.5)``
  clamped to [0, 255], the rounding the sample grids use; one channel repeated to three;
- the feature extractor: torch-fidelity's Inception-v3 (2048-d pool features) with its own
  TF1-compatible bilinear resize to 299x299 (torchmetrics ``antialias=False``: torchmetrics
  defaults to torch's antialiased resize, which gives numbers that differ from the published
  TF/torch-fidelity FIDs), and the sha256 of its weights file;
- KID's random subsets: drawn under a fixed seed, so the same images give the same KID.

Features are extracted once per image, here, and handed to the torchmetrics metrics through an
identity "feature extractor": the reference set's features are computed once (on the first score)
and kept, so a periodic evaluation only runs Inception on its generated images, and FID and KID
share one forward pass.

torchmetrics and torch-fidelity are imported when an evaluator is built (they are the optional
``metrics`` extra), and nothing is downloaded at import: the Inception weights are torch-fidelity's
download only when ``weights`` is None and only when the evaluator is constructed.
"""
from __future__ import annotations

import hashlib
import os
import tarfile
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn as nn

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
INCEPTION_NAME = "torch-fidelity inception-v3-compat (pool3, 2048-d)"
INCEPTION_RESIZE = ("bilinear to 299x299, TF1-compatible (torch-fidelity interpolate_bilinear_2d_like_tensorflow1x; "
                    "torchmetrics antialias=False)")
TO_UINT8 = "clamp(round((x + 1) * 127.5), 0, 255) from [-1, 1] (round half to even); 1 channel repeated to 3"
KID_SEED = 0


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) float in [-1, 1] -> (N, 3, H, W) uint8, the pinned conversion (one channel repeated)."""
    if images.ndim != 4:
        raise ValueError(f"expected images (N, C, H, W), got shape {tuple(images.shape)}")
    if images.shape[1] == 1:
        images = images.repeat(1, 3, 1, 1)
    if images.shape[1] != 3:
        raise ValueError(f"expected 3-channel (or 1-channel) images, got {images.shape[1]} channels")
    if images.dtype != torch.uint8:
        images = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return images.contiguous()  # one memory layout: a channels-last batch may take another conv kernel and differ in the last bits


def _import_metrics():
    """torchmetrics, checked at construction so that a missing or broken install stops a run at startup, not
    at its first evaluation (torch-fidelity imports torchvision, which must match the installed torch)."""
    try:
        import torchmetrics
        import torchmetrics.image.fid  # noqa: F401  (imports torch-fidelity)
        import torchmetrics.image.kid  # noqa: F401
    except (ImportError, RuntimeError) as e:  # a torchvision built for another torch fails with RuntimeError
        raise ImportError(f"FID needs torchmetrics and torch-fidelity (pip install -e '.[metrics]'), and torch-fidelity needs "
                          f"a torchvision that imports beside this torch ({torch.__version__}): {type(e).__name__}: {e}") from e
    return torchmetrics


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from safetensors or a ``torch.load(weights_only=True)``-safe file: never a pickle that can run code."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"feature extractor weights {str(path)!r} do not exist: give a local .safetensors or .pt/.pth file, "
                                "or weights: null for torch-fidelity's own Inception download")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # an unsafe or non-torch file
        raise ValueError(f"{path}: not loadable with torch.load(weights_only=True) ({e}); save a plain state dict "
                         "(torch.save(model.state_dict(), path)) or a .safetensors file") from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a state dict (name -> tensor), got {type(state).__name__}")
    return state


def _inception(weights: str | os.PathLike | None) -> nn.Module:
    """torchmetrics' Inception (torch-fidelity's network) with the TF1-compatible resize.

    torch-fidelity reads a local weights file with ``torch.load(weights_only=False)``, which can run
    code stored in the file; so the file is read safely here first and torch-fidelity is handed a
    copy written from those plain tensors (through torchmetrics' ``feature_extractor_weights_path``)."""
    from torchmetrics.image.fid import NoTrainInceptionV3

    if weights is None:
        return NoTrainInceptionV3("inception-v3-compat", ["2048"], antialias=False)  # torch-fidelity's download
    state = load_weights(weights)
    with tempfile.TemporaryDirectory() as tmp:
        copy = os.path.join(tmp, "inception.pt")
        torch.save(state, copy)
        return NoTrainInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=copy, antialias=False)


def _downloaded_inception() -> Path:
    """Where torch-fidelity's download of the Inception weights lands (torch hub's checkpoint cache)."""
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    return Path(torch.hub.get_dir()) / "checkpoints" / URL_INCEPTION_V3.rsplit("/", 1)[-1]


class _Precomputed(nn.Module):
    """The torchmetrics metrics' "feature extractor": the features were already extracted here."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


class _CLIPFeatures(nn.Module):
    """A CLIPModel whose ``get_*_features`` return the projected embeddings as tensors, as torchmetrics'
    CLIPScore expects: transformers 5 returns a ``BaseModelOutputWithPooling`` there, which torchmetrics
    1.9 does not unpack (its pull request #3428)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model, self.config = model, model.config

    @staticmethod
    def _tensor(out) -> torch.Tensor:
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def get_image_features(self, *args, **kwargs) -> torch.Tensor:
        return self._tensor(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args, **kwargs) -> torch.Tensor:
        return self._tensor(self.model.get_text_features(*args, **kwargs))


# ---------------------------------------------------------------- reference sets
class _Reference:
    """The pinned reference set: its keys (all keys sorted, the first ``max_reference``) and a reader of
    those samples."""

    def __init__(self, path: str | os.PathLike | None, max_reference: int, decode: Callable | None):
        if path is None or str(path) == "":
            raise ValueError("FID needs a reference set of real images: set reference: PATH (a shard folder written by "
                             "data/prepare.py, with manifest.json, or a folder of PNG/JPEG images)")
        self.path = Path(path).expanduser()
        if not self.path.is_dir():
            raise FileNotFoundError(f"FID reference {str(self.path)!r} does not exist (or is not a folder): point reference at a "
                                    "shard folder (with manifest.json) or a folder of PNG/JPEG images")
        if max_reference < 2:
            raise ValueError(f"max_reference={max_reference}: FID needs at least 2 reference images")
        self.decode, self.latent = decode, False
        if (self.path / "manifest.json").is_file():
            self.kind = "shards"
            all_keys = self._shard_keys()
        else:
            self.kind = "images"
            self._files = {p.relative_to(self.path).as_posix(): p for p in self.path.rglob("*")
                           if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()}
            if not self._files:
                raise ValueError(f"FID reference {str(self.path)!r} has no manifest.json and no PNG/JPEG images: point it at a "
                                 "shard folder written by data/prepare.py or a folder of images")
            all_keys = self._files
        self.keys = sorted(all_keys)[:max_reference]
        if len(self.keys) < 2:
            raise ValueError(f"FID reference {str(self.path)!r} holds {len(self.keys)} image(s); FID needs at least 2")
        self.keys_sha256 = hashlib.sha256("\n".join(self.keys).encode()).hexdigest()

    def _shard_keys(self) -> dict[str, str]:
        """Every sample key -> its shard, from the tar headers alone (tarfile seeks over the payloads):
        sorting needs every key, and only the chosen samples are read later."""
        from data.shards import read_manifest

        self.manifest = read_manifest(self.path)
        self.autoencoder = self.manifest.get("autoencoder", "none")
        self.latent = self.autoencoder not in (None, "none")  # pixel shards hold the images themselves, in [-1, 1]
        if self.latent and self.decode is None:
            raise ValueError(f"FID reference {str(self.path)!r} holds latents of autoencoder {self.autoencoder!r}, not images: "
                             "pass decode= (stored raw latents -> images in [-1, 1], e.g. lambda z: ae.decode(ae.normalize(z))), "
                             "or point reference at pixel shards (autoencoder: none) or a folder of images")
        self._shard_of: dict[str, str] = {}
        for shard in self.manifest["shards"]:
            with tarfile.open(self.path / shard["name"], "r") as tar:
                for name in tar.getnames():
                    self._shard_of.setdefault(os.path.basename(name).partition(".")[0], shard["name"])
        return self._shard_of

    def __iter__(self) -> Iterator[tuple[int, torch.Tensor]]:
        """(position in ``keys``, sample): uint8 (3, H, W) from image files, in key order; from shards, in storage
        order, the stored float (C, h, w): pixels in [-1, 1], or latents for ``decode``."""
        position = {k: i for i, k in enumerate(self.keys)}
        if self.kind == "images":
            from PIL import Image

            for i, key in enumerate(self.keys):
                with Image.open(self._files[key]) as im:
                    rgb = np.asarray(im.convert("RGB"))  # grey -> 3 equal channels; alpha dropped
                yield i, torch.from_numpy(rgb.copy()).permute(2, 0, 1)
            return
        from data.shards import _iter_tar, decode_sample

        for name in sorted({self._shard_of[k] for k in self.keys}):
            for key, group in _iter_tar(self.path / name):
                if key in position and self._shard_of[key] == name:
                    latent = torch.from_numpy(np.array(decode_sample(key, group)["latent"], dtype=np.float32))
                    yield position[key], latent

    def describe(self) -> dict:
        out = {"reference": str(self.path), "reference_kind": self.kind, "reference_count": len(self.keys),
               "reference_keys_sha256": self.keys_sha256}
        if self.kind == "shards":
            out["reference_autoencoder"] = self.autoencoder
        return out


# ---------------------------------------------------------------- the evaluator
class FIDEvaluator:
    """FID, KID (and CLIP score) of generated images against a pinned reference set of real images.

    reference: a shard folder (data/shards.py: pixel shards, or latent shards with ``decode``) or a
        folder of PNG/JPEG images; its first ``max_reference`` samples in sorted key order are used.
    weights: the Inception weights: None = torch-fidelity's own download (made here, at construction),
        or a local .safetensors / .pt file (read with ``weights_only=True``). With ``feature_extractor``,
        optional weights loaded into it (strictly).
    feature_extractor: instead of Inception, any module mapping uint8 (N, 3, H, W) -> (N, D) features
        (resizing itself if it needs to): small random ones keep the tests fast.
    decode: for latent shards: stored raw latents (N, C, h, w) float -> images (N, 3, H, W) in [-1, 1].
    kid_subset_size: KID's subset size, capped at the number of generated and of reference images.
    clip_model: a CLIP model for CLIP score of images against their descriptions: a local folder or a
        hub name of a transformers ``CLIPModel`` + ``CLIPProcessor``; None: no CLIP score (nothing loaded).

    ``score`` scores the whole set, not each condition, so the evaluation hands it exactly its
    ``samples`` count (``per_condition = False``)."""

    name = "fid"
    per_condition = False

    def __init__(self, reference, weights: str | os.PathLike | None = None, feature_extractor: nn.Module | None = None,
                 max_reference: int = 5000, kid_subset_size: int = 1000, kid_subsets: int = 100,
                 clip_model: str | None = None, decode: Callable[[torch.Tensor], torch.Tensor] | None = None, batch_size: int = 50):
        torchmetrics = _import_metrics()
        self.reference = _Reference(reference, int(max_reference), decode)
        if int(kid_subset_size) < 2:
            raise ValueError(f"kid_subset_size={kid_subset_size}: KID needs subsets of at least 2 images")
        self.kid_subset_size, self.kid_subsets, self.batch_size = int(kid_subset_size), int(kid_subsets), int(batch_size)
        if feature_extractor is None:
            self.extractor = _inception(weights)
            extractor = {"name": INCEPTION_NAME, "resize": INCEPTION_RESIZE}
        else:
            self.extractor = feature_extractor
            if weights is not None:
                self.extractor.load_state_dict(load_weights(weights))
            extractor = {"name": type(feature_extractor).__name__, "resize": "the feature extractor's own"}
        self.extractor.eval().requires_grad_(False)
        if weights is not None:
            extractor.update(weights=str(weights), weights_sha256=sha256_file(weights))
        elif feature_extractor is None:
            cached = _downloaded_inception()
            extractor.update(weights=f"torch-fidelity download ({cached.name})",
                             weights_sha256=sha256_file(cached) if cached.is_file() else None)
        else:
            extractor.update(weights="the module's own (no file)", weights_sha256=None)
        self.clip_model = None if clip_model is None else str(clip_model)
        self._clip = None if self.clip_model is None else self._load_clip(self.clip_model)
        self._setup = {**self.reference.describe(), "feature_extractor": extractor["name"], "feature_weights": extractor["weights"],
                       "feature_weights_sha256": extractor["weights_sha256"], "resize": extractor["resize"], "to_uint8": TO_UINT8,
                       "kid_subsets": self.kid_subsets, "kid_seed": KID_SEED, "clip_model": self.clip_model,
                       "torchmetrics": torchmetrics.__version__}
        self._feature_dim = 2048 if feature_extractor is None else None  # a given extractor's: known once it has run
        self._ref_features: torch.Tensor | None = None
        self._fid = None

    @staticmethod
    def _load_clip(name: str):
        """torchmetrics' CLIPScore with a transformers CLIP model from a local folder or the hub, handed in as a
        loader (CLIPScore itself takes only the few hub names it lists)."""
        from torchmetrics.multimodal.clip_score import CLIPScore

        path = Path(name).expanduser()
        source = str(path) if path.is_dir() else name

        def load():
            from transformers import CLIPModel, CLIPProcessor

            return _CLIPFeatures(CLIPModel.from_pretrained(source)), CLIPProcessor.from_pretrained(source)

        return CLIPScore(model_name_or_path=load, sync_on_compute=False)

    # ---------------------------------------------------------------- features
    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) in [-1, 1] (or uint8) -> (N, D) float32 features, in batches, on the images' device."""
        self.extractor.to(images.device)
        out = [self.extractor(to_uint8(images[i : i + self.batch_size])) for i in range(0, images.shape[0], self.batch_size)]
        return torch.cat(out).float()

    @torch.no_grad()
    def reference_features(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """The reference set's features, extracted once (same-sized images batched) and kept, in key order."""
        if self._ref_features is None:
            rows: dict[int, torch.Tensor] = {}
            pending: dict[tuple, list[tuple[int, torch.Tensor]]] = {}

            def flush(shape):
                idx, items = zip(*pending.pop(shape))
                batch = torch.stack(items).to(device)
                if self.reference.latent:
                    batch = self.reference.decode(batch)
                rows.update(zip(idx, self.features(batch).cpu()))

            for i, item in self.reference:
                pending.setdefault(tuple(item.shape), []).append((i, item))
                if len(pending[tuple(item.shape)]) >= self.batch_size:
                    flush(tuple(item.shape))
            for shape in list(pending):
                flush(shape)
            self._ref_features = torch.stack([rows[i] for i in range(len(rows))])
        return self._ref_features

    # ---------------------------------------------------------------- scores
    def describe(self, num_generated: int | None = None) -> dict:
        """Everything pinned about this FID (what a reader needs to compare two numbers)."""
        out = dict(self._setup)
        out["feature_dim"] = int(self._ref_features.shape[1]) if self._ref_features is not None else self._feature_dim
        if num_generated is not None:
            out.update(num_generated=num_generated,
                       kid_subset_size=min(self.kid_subset_size, num_generated, len(self.reference.keys)))
        return out

    def score(self, images: torch.Tensor, descriptions: list[str] | None = None) -> dict:
        """{fid, kid, kid_std, [clip_score], fid_setup} of generated images (N, 3, H, W) in [-1, 1] against the
        reference set; ``descriptions`` (prompts or class names, one per image) are what CLIP score reads."""
        from torchmetrics.image.fid import FrechetInceptionDistance
        from torchmetrics.image.kid import KernelInceptionDistance

        n = images.shape[0]
        if n < 2:
            raise ValueError(f"FID needs at least 2 generated images, got {n}: raise the evaluation's sample count "
                             "(data.eval_samples)")
        if self._clip is not None and (descriptions is None or len(descriptions) != n):
            raise ValueError(f"CLIP score needs one description per image: {n} images, "
                             f"{None if descriptions is None else len(descriptions)} descriptions")
        fake = self.features(images).cpu()
        real = self.reference_features(images.device)
        # The metrics run on the CPU and never sync across processes: the trainer evaluates on rank 0 alone,
        # and torchmetrics' default sync on compute would wait for ranks that never come.
        if self._fid is None:  # reference statistics accumulated once, kept across resets
            self._fid = FrechetInceptionDistance(feature=_Precomputed(real.shape[1]), reset_real_features=False, sync_on_compute=False)
            self._fid.update(real, real=True)
        self._fid.update(fake, real=False)
        fid = float(self._fid.compute())
        self._fid.reset()
        subset = min(self.kid_subset_size, n, real.shape[0])
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
            kid_metric = KernelInceptionDistance(feature=_Precomputed(real.shape[1]), subsets=self.kid_subsets, subset_size=subset,
                                                 sync_on_compute=False)
        kid_metric.update(real, real=True)
        kid_metric.update(fake, real=False)
        with torch.random.fork_rng(devices=[]):  # KID's subsets from a fixed seed, the caller's RNG untouched
            torch.manual_seed(KID_SEED)
            kid, kid_std = kid_metric.compute()
        result = {"fid": fid, "kid": float(kid), "kid_std": float(kid_std)}
        if self._clip is not None:
            result["clip_score"] = self._clip_score(images, descriptions)
        result["fid_setup"] = self.describe(num_generated=n)
        return result

    @torch.no_grad()
    def _clip_score(self, images: torch.Tensor, descriptions: list[str]) -> float:
        clip = self._clip.to(images.device)
        clip.reset()
        for i in range(0, images.shape[0], self.batch_size):
            clip.update(to_uint8(images[i : i + self.batch_size]), list(descriptions[i : i + self.batch_size]))
        return float(clip.compute())
