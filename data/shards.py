"""WebDataset-format latent shards: writer, manifest, and a resumable reader.

A shard is a plain tar whose members are grouped by key (WebDataset layout):
``<key>.latent.npy`` (fp16, the autoencoder's raw posterior mean, or pixels in
[-1, 1] for ``autoencoder: none``), ``<key>.json`` (caption(s), class, original
size, bucket, scores) and optional ``<key>.text.npy`` / ``<key>.mask.npy``.
``manifest.json`` beside the shards records what produced them (autoencoder and
its scaling, text encoder, token length, latent shape, per-shard counts); the
trainer refuses shards whose manifest disagrees with its config. Text shards keep
the empty prompt's embedding (the CFG null condition) beside them as ``null_text.npy``.
Caption embeddings are stored trimmed to their real tokens (models/text_encoder.py).

This is the project's one reader and writer of shard folders: data preparation, the
demo data, subsets and the trainer's loader all go through it.

The reader is an ``IterableDataset`` yielding whole batches. Each (rank,
dataloader worker) slot reads a disjoint part of the data: whole shards when
there are at least as many shards as slots, else every n-th sample. Order is
reshuffled per epoch (shard order, several shards read at once with their samples
interleaved, and a shuffle buffer) from a seed, so the stream is a pure function of
(seed, epoch, slot) and resuming after k batches is exact: each worker skips what it
already produced.
"""
from __future__ import annotations

import io
import json
import math
import os
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator
from zlib import error as zlib_error

import numpy as np
import torch

from models.atomic import AtomicFile, atomic_directory, atomic_write_bytes, atomic_write_text
from models.text_encoder import pad

MANIFEST = "manifest.json"
FORMAT = "flowdit-shards-v1"
NULL_TEXT = "null_text.npy"
INTERLEAVE = 8  # ShardStream's default: shards each reader reads at once


class ShardError(RuntimeError):
    """Shards missing, malformed, or disagreeing with the config."""


# ---------------------------------------------------------------- writing
def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def add_member(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    info.mtime = 0  # byte-identical shards for identical inputs
    tar.addfile(info, io.BytesIO(payload))


def write_null(data_dir, embedding: np.ndarray) -> None:
    """The empty prompt's embedding, atomically (several preparation workers may write the same, identical file)."""
    atomic_write_bytes(Path(data_dir) / NULL_TEXT, npy_bytes(np.asarray(embedding, dtype=np.float16)))


def read_null(data_dir) -> np.ndarray:
    path = Path(data_dir) / NULL_TEXT
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: text shards keep the empty prompt's embedding there (the CFG null condition)")
    return np.load(path, allow_pickle=False)


class ShardWriter:
    """Writes fixed-size tar shards atomically (``.tar.tmp`` then rename) and the manifest.

    with ShardWriter(out_dir, samples_per_shard=1000, manifest_fields={...}) as w:
        w.write(key, latent_fp16, meta_dict)
    """

    def __init__(self, out_dir: str | os.PathLike, samples_per_shard: int = 1000, manifest_fields: dict | None = None, prefix: str = "shard"):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.samples_per_shard = samples_per_shard
        self.prefix = prefix
        self.manifest_fields = dict(manifest_fields or {})
        self.shards: list[dict[str, Any]] = []
        self._tar: tarfile.TarFile | None = None
        self._count = 0
        self._latent_shape: list[int] | None = None

    def _open(self) -> None:
        name = f"{self.prefix}-{len(self.shards):06d}.tar"
        self._file = AtomicFile(self.out_dir / name, tmp=self.out_dir / (name + ".tmp"))
        self._tar = tarfile.open(self._file.tmp, "w")
        self._name, self._count = name, 0

    def _close_shard(self) -> None:
        assert self._tar is not None
        self._tar.close()
        self._file.commit()
        self.shards.append({"name": self._name, "num_samples": self._count})
        self._tar = None

    def write(self, key: str, latent: np.ndarray, meta: dict, arrays: dict[str, np.ndarray] | None = None) -> None:
        if "." in key or "/" in key:
            raise ValueError(f"sample key {key!r} must not contain '.' or '/' (WebDataset splits keys at the first dot)")
        if self._tar is None:
            self._open()
        latent = np.asarray(latent, dtype=np.float16)
        if self._latent_shape is None:
            self._latent_shape = list(latent.shape)
        add_member(self._tar, f"{key}.latent.npy", npy_bytes(latent))
        add_member(self._tar, f"{key}.json", json.dumps(meta, sort_keys=True).encode())
        for ext, arr in (arrays or {}).items():
            add_member(self._tar, f"{key}.{ext}.npy", npy_bytes(np.asarray(arr)))
        self._count += 1
        if self._count >= self.samples_per_shard:
            self._close_shard()

    def close(self) -> dict:
        if self._tar is not None:
            self._close_shard()
        manifest = {
            "format": FORMAT,
            "latent_shape": self._latent_shape,
            **self.manifest_fields,
            "num_samples": sum(s["num_samples"] for s in self.shards),
            "shards": self.shards,
        }
        atomic_write_text(self.out_dir / MANIFEST, json.dumps(manifest, indent=2))
        return manifest

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is None:
            self.close()
        elif self._tar is not None:  # never leave a half-written shard that looks finished
            self._tar.close()
            self._file.abort()


def write_subset(src, dst, keep, samples_per_shard: int = 2000) -> int:
    """Copy the samples whose metadata passes ``keep(meta)`` into a new shard folder (atomic shards,
    a manifest with the source's fields, the null text embedding), built in a temporary folder
    that is renamed when complete. Returns the number kept."""
    manifest = read_manifest(src)
    fields = {k: v for k, v in manifest.items() if k not in ("format", "latent_shape", "num_samples", "shards", "buckets")}
    fields["subset_of"] = str(src)
    bucketed = manifest.get("latent_shape") is None
    if bucketed:
        fields["latent_shape"] = None  # shapes vary: overrides the writer's first-sample shape
    dst = Path(dst)
    for stale in dst.parent.glob(f".{dst.name}.*.tmp"):  # left by a writer that died mid-way
        if not _pid_alive(stale.name.rsplit(".", 2)[-2]):
            shutil.rmtree(stale, ignore_errors=True)
    if dst.exists() and not (dst / MANIFEST).exists():  # an incomplete folder from an older, interrupted attempt
        shutil.rmtree(dst, ignore_errors=True)
    n, buckets = 0, {}
    # built per process (two runs may build the same subset at once: the first to finish wins)
    with atomic_directory(dst, tmp=dst.with_name(f".{dst.name}.{os.getpid()}.tmp"), replace=False) as tmp:
        with ShardWriter(tmp, samples_per_shard, manifest_fields=fields) as w:
            for s in manifest["shards"]:
                for key, group in _iter_tar(Path(src) / s["name"]):
                    meta = json.loads(group["json"])
                    if not keep(meta):
                        continue
                    arrays = {ext[: -len(".npy")]: np.load(io.BytesIO(b), allow_pickle=False)
                              for ext, b in group.items() if ext.endswith(".npy") and ext != "latent.npy"}
                    w.write(key, np.load(io.BytesIO(group["latent.npy"]), allow_pickle=False), meta, arrays)
                    n += 1
                    if bucketed:
                        b = "x".join(str(v) for v in meta.get("bucket", []))
                        buckets[b] = buckets.get(b, 0) + 1
            if n == 0:
                raise ShardError(f"no sample of {src} passes the subset filter: lower the threshold")
            if bucketed:
                w.manifest_fields["buckets"] = buckets
        null = Path(src) / NULL_TEXT
        if null.is_file():
            shutil.copy(null, tmp / NULL_TEXT)
    return n


def _pid_alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


# ---------------------------------------------------------------- manifest
def read_manifest(data_dir: str | os.PathLike) -> dict:
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise ShardError(
            f"data directory {str(data_dir)!r} does not exist. Point data.path at a folder of shards "
            "made by data/prepare.py (or, for the demo, use data=shapes, which builds its own)."
        )
    path = data_dir / MANIFEST
    if not path.is_file():
        raise ShardError(f"{path} is missing: {data_dir} is not a shard folder written by this project's ShardWriter")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise ShardError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    missing = [s["name"] for s in manifest["shards"] if not (data_dir / s["name"]).is_file()]
    if missing:
        raise ShardError(f"{data_dir}: the manifest lists shards that are not there: {missing[:5]}")
    return manifest


def check_manifest(manifest: dict, expected: dict[str, Any], where: str = "") -> None:
    """Stop with every disagreement between the shards' manifest and the config at once."""
    problems = [
        f"  {k}: config expects {v!r}, shards have {manifest.get(k)!r}"
        for k, v in expected.items()
        if manifest.get(k) != v
    ]
    if problems:
        raise ShardError(
            f"the shards in {where or 'data.path'} do not match the training config:\n"
            + "\n".join(problems)
            + "\nRe-encode the data with matching settings, or fix the config (data group) to match the shards."
        )


# ---------------------------------------------------------------- reading
def _members(path: Path) -> Iterator[tuple[str, bytes]]:
    """(name, payload) of a tar's regular files. A small ustar reader (the shards are plain tars
    with short ASCII names), several times faster than ``tarfile`` per member; anything it does
    not handle (PAX/GNU long names, sparse files) falls back to ``tarfile`` for the whole shard."""
    with open(path, "rb") as f:
        names = []
        while True:
            header = f.read(512)
            if len(header) < 512:  # a complete tar ends with zero blocks, not with the file
                raise tarfile.ReadError(f"{path.name} ends without the end-of-archive marker (truncated)")
            if not header.strip(b"\0"):
                return  # end-of-archive blocks
            kind = header[156:157]
            if kind not in (b"0", b"\0") or header[345:500].strip(b"\0"):  # not a plain file, or a prefix field
                if names:
                    raise tarfile.ReadError(f"{path.name}: unsupported member after the first (type {kind!r})")
                break
            try:
                size = int(header[124:136].strip(b"\0 ") or b"0", 8)
            except ValueError:
                raise tarfile.ReadError(f"corrupt tar header in {path.name}") from None
            name = header[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
            payload = f.read(size)
            if len(payload) < size:
                raise tarfile.ReadError(f"{path.name}: member {name!r} is truncated")
            f.seek((-size) % 512, 1)
            names.append(name)
            yield name, payload
    with tarfile.open(path, "r") as tar:  # the general reader
        for member in tar:
            if member.isfile():
                yield member.name, tar.extractfile(member).read()


def _iter_tar(path: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Group a tar's members by key: yields (key, {ext: bytes})."""
    key, group = None, {}
    for name, payload in _members(path):
        base = os.path.basename(name)
        k, _, ext = base.partition(".")
        if k != key and group:
            yield key, group
            group = {}
        key = k
        group[ext] = payload
    if group:
        yield key, group


_NPY_HEADERS: dict[bytes, tuple[np.dtype, tuple, bool]] = {}


def load_npy(payload: bytes) -> np.ndarray:
    """``np.load`` of an in-memory .npy without pickle, with parsed headers cached (most samples
    share a few), which makes decoding several times faster than np.load per array."""
    if payload[:6] != b"\x93NUMPY":
        raise ValueError("not a .npy payload")
    major = payload[6]
    hlen_size = 2 if major == 1 else 4
    hlen = int.from_bytes(payload[8 : 8 + hlen_size], "little")
    start = 8 + hlen_size + hlen
    header = payload[:start]
    parsed = _NPY_HEADERS.get(header)
    if parsed is None:
        buf = io.BytesIO(header)
        version = np.lib.format.read_magic(buf)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(buf)  # parses the header literal; never unpickles
        if dtype.hasobject:
            raise ValueError("object arrays are not allowed in shards")
        parsed = (dtype, shape, fortran)
        if len(_NPY_HEADERS) < 4096:
            _NPY_HEADERS[header] = parsed
    dtype, shape, fortran = parsed
    count = int(np.prod(shape))
    if len(payload) - start < count * dtype.itemsize:
        raise ValueError("truncated .npy payload")
    arr = np.frombuffer(payload, dtype=dtype, count=count, offset=start)
    return arr.reshape(shape[::-1]).T if fortran else arr.reshape(shape)


def decode_sample(key: str, group: dict[str, bytes], text_names: list[str] | None = None) -> dict[str, Any]:
    """Decoded arrays and metadata of one sample; with ``text_names`` only those captions' embeddings."""
    sample = {"__key__": key, "latent": load_npy(group["latent.npy"])}
    sample["meta"] = json.loads(group["json"])  # every sample has one; a missing one means damage
    for ext, payload in group.items():
        if ext.endswith(".npy") and ext != "latent.npy":
            name = ext[: -len(".npy")]
            if text_names is not None and name.startswith("text_") and name[len("text_"):] not in text_names:
                continue
            sample[name] = load_npy(payload)
    return sample


def collate(samples: list[dict[str, Any]], text_length: int | None = None) -> dict[str, Any]:
    """Stack a list of decoded samples. Stored caption embeddings ``text_<name>`` become
    ``batch["text"][name] = (hidden (N, text_length, D), mask (N, text_length))``."""
    batch: dict[str, Any] = {
        "latent": torch.from_numpy(np.stack([s["latent"] for s in samples])).float(),
        "meta": [s["meta"] for s in samples],
        "keys": [s["__key__"] for s in samples],
    }
    if all("label" in s["meta"] for s in samples):
        batch["label"] = torch.tensor([int(s["meta"]["label"]) for s in samples])
    if all("image" in s for s in samples):  # data.prepare --keep-images: the pixels, (N, 3, H, W) uint8
        batch["image"] = torch.from_numpy(np.stack([s["image"] for s in samples]))
    controls = sorted({k[len("control_"):] for s in samples for k in s if k.startswith("control_")})
    if controls:  # ControlNet: each stored control map, (N, C, H, W) like the latents
        batch["control"] = {n: torch.from_numpy(np.stack([s[f"control_{n}"] for s in samples])).float()
                            for n in controls if all(f"control_{n}" in s for s in samples)}
    names = sorted({k[len("text_") :] for s in samples for k in s if k.startswith("text_")})
    if names:
        length = text_length or max(s[f"text_{n}"].shape[0] for s in samples for n in names)
        batch["text"] = {}
        for n in names:  # a sample without this caption uses one it has (captions are optional per sample)
            batch["text"][n] = pad([s.get(f"text_{n}", next((s[k] for k in s if k.startswith("text_")), None)) for s in samples],
                                   length)
    return batch


def is_bucketed(manifest: dict) -> bool:
    """Aspect-ratio buckets: each sample's shape comes from its bucket, the manifest records no one shape."""
    return manifest.get("latent_shape") is None and bool(manifest.get("buckets"))


@dataclass
class SampleCheck:
    """What every training sample must be, checked as it is read; a sample that is not is skipped and
    counted like unreadable data (``max_bad_fraction``), never handed to the model.

    latent_shape: (C, H, W) for square data; for aspect-ratio buckets None, with ``channels`` and
    ``downsample`` giving each sample's shape from its bucket (pixels). num_classes: labels must
    lie in [0, num_classes) (None: labels are not needed). text: whether a stored caption
    embedding is needed. control: the control map a ControlNet run needs (``control_<name>``, the
    latent's shape). Latents, embeddings and control maps must be floating point and finite.
    """

    latent_shape: tuple[int, ...] | None = None
    channels: int | None = None
    downsample: int = 1
    num_classes: int | None = None
    text: bool = False
    control: str | None = None

    def problem(self, sample: dict[str, Any]) -> str | None:
        latent, meta = sample["latent"], sample["meta"]
        want = self.latent_shape
        if want is None and self.channels is not None and meta.get("bucket"):
            h, w = meta["bucket"]
            want = (self.channels, int(h) // self.downsample, int(w) // self.downsample)
        if want is not None and tuple(latent.shape) != tuple(want):
            return f"has a latent of shape {tuple(latent.shape)}, not {tuple(want)}"
        if self.num_classes is not None:
            label = meta.get("label")
            if not isinstance(label, int) or not 0 <= label < self.num_classes:
                return f"has label {label!r}, not a class id in 0..{self.num_classes - 1}"
        arrays = {"latent": latent, **{k: v for k, v in sample.items() if k.startswith("text_")}}
        if self.text and len(arrays) == 1:
            return "has no stored caption embedding"
        if self.control is not None:
            control = sample.get(f"control_{self.control}")
            if control is None:
                return f"has no {self.control!r} control map"
            if control.shape != latent.shape:
                return f"has a {self.control!r} control map of shape {tuple(control.shape)}, not the latent's {tuple(latent.shape)}"
            arrays[f"control_{self.control}"] = control
        for name, a in arrays.items():
            if not np.issubdtype(a.dtype, np.floating) or not np.isfinite(a).all():
                return f"has a {name} that is not finite floating point ({a.dtype})"
        return None


@dataclass
class _Slot:
    index: int
    count: int


class ShardStream(torch.utils.data.IterableDataset):
    """Infinite, deterministic, resumable stream of batches from a shard folder.

    Args:
        data_dir: folder with ``manifest.json`` and the shards.
        batch_size: samples per yielded batch (the per-rank micro-batch).
        rank, world_size: this process's DDP position.
        seed: base seed of the shuffles.
        shuffle_buffer: samples held for shuffling (0 = read in order).
        start_batch: batches this rank already consumed (resume position).
        start_positions: {role: samples read} when resuming: the exact place in each reader's stream
            (bad samples make batches take more than batch_size samples); from each batch's "position".
        check: a SampleCheck every sample must pass (None: only decodability).
        interleave: shards each reader reads at once, its next sample drawn from a random one of them
            (seeded), each replaced by the reader's next shard when it runs out; before the shuffle
            buffer. Shards written in class order hold one or two classes each: reading several at
            once mixes them. 1: one shard after the other.
    With a DataLoader of W workers, batch i of this rank comes from worker i % W.
    """

    def __init__(self, data_dir, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0, shuffle_buffer: int = 1000,
                 start_batch: int = 0, max_bad_fraction: float = 0.01, text_names: list[str] | None = None,
                 start_positions: dict[int, int] | None = None, check: SampleCheck | None = None,
                 interleave: int = INTERLEAVE):
        super().__init__()
        if int(interleave) < 1:
            raise ValueError(f"interleave={interleave}: shards read at once, 1 or more")
        self.interleave = int(interleave)
        self.data_dir = Path(data_dir)
        self.manifest = read_manifest(self.data_dir)
        self.shards = [(self.data_dir / s["name"], s["num_samples"]) for s in self.manifest["shards"]]
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.seed, self.shuffle_buffer, self.start_batch = seed, shuffle_buffer, start_batch
        self.text_length = (self.manifest.get("text_encoder") or {}).get("max_length")  # pad stored embeddings to this
        # aspect-ratio buckets (data/prepare.py --buckets): every batch from one bucket
        self.bucketed = is_bucketed(self.manifest)
        self.max_bad_fraction = max_bad_fraction
        self.text_names = list(text_names) if text_names is not None else None  # decode only these captions' embeddings
        self.start_positions = {int(k): int(v) for k, v in (start_positions or {}).items()}
        self.check = check
        self.bad_samples, self._produced, self._seen = 0, 0, 0

    def state_dict(self) -> dict[str, Any]:
        """The reading position (batches produced, samples read) and what it depends on. Without DataLoader
        workers this object counts its batches; with workers the trainer's count is authoritative."""
        return {"start_batch": self.start_batch + self._produced, "positions": dict(self.start_positions), "seed": self.seed,
                "world_size": self.world_size, "rank": self.rank, "batch_size": self.batch_size, "interleave": self.interleave}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state = {"interleave": 1, **state}  # states from before interleaving read one shard at a time
        for k in ("seed", "world_size", "batch_size", "interleave"):
            if state[k] != getattr(self, k):
                raise ShardError(f"cannot resume the loader: {k} was {state[k]} and is now {getattr(self, k)}")
        self.start_batch, self._produced = int(state["start_batch"]), 0
        self.start_positions = {int(k): int(v) for k, v in (state.get("positions") or {}).items()}

    def _bad(self, what: str, count: int, slot: _Slot) -> None:
        """Skip bad data with a warning and count it; too much of it stops the run."""
        import warnings

        self.bad_samples += count
        total = max(self._epoch_size(0, slot), self._seen, 1)  # one epoch's share, or all read so far
        warnings.warn(f"{what}; skipped ({self.bad_samples} bad samples so far in this reader)", stacklevel=3)
        if self.bad_samples > self.max_bad_fraction * total:
            raise ShardError(
                f"{self.data_dir}: {self.bad_samples} bad samples out of {total} this reader owns, more than "
                f"data.max_bad_fraction={self.max_bad_fraction}. The shards are damaged: re-run data/prepare.py "
                "(it redoes missing shards) or raise data.max_bad_fraction to train on what is readable."
            )

    def _slot(self) -> tuple[_Slot, int, int]:
        """(this reader's slot among all ranks x workers, workers per rank, this reader's role).

        A DataLoader hands out batch i from worker i % W and always starts at worker 0,
        so after resuming at batch k, worker w plays the role of worker (w + k) % W.
        """
        info = torch.utils.data.get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        role = (worker + self.start_batch) % workers
        return _Slot(self.rank * workers + role, self.world_size * workers), workers, role

    def _epoch_samples(self, epoch: int, slot: _Slot) -> Iterator[tuple[str, dict[str, bytes]]]:
        """One epoch of the slot's samples: its shards in this epoch's order, ``interleave`` at a time,
        through the shuffle buffer. With fewer shards than slots, every slot reads all shards, interleaved
        alike (seeded without the slot), and keeps every n-th sample."""
        rng = np.random.default_rng([self.seed, epoch, slot.index])
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.shards))
        by_shard = len(self.shards) >= slot.count
        mine = order[slot.index :: slot.count] if by_shard else order
        # the interleaving's own stream (a spawn key apart from the others): per slot, or one for all slots
        mix = np.random.default_rng(np.random.SeedSequence([self.seed, epoch, slot.index] if by_shard else [self.seed, epoch],
                                                           spawn_key=(1 if by_shard else 2,)))
        buffer: list = []
        i = -1
        for item in self._interleaved(mine, slot, mix):
            i += 1
            if not by_shard and i % slot.count != slot.index:
                continue
            if self.shuffle_buffer <= 1:
                yield item
                continue
            buffer.append(item)
            if len(buffer) >= self.shuffle_buffer:
                j = rng.integers(len(buffer))
                buffer[j], buffer[-1] = buffer[-1], buffer[j]
                yield buffer.pop()
        rng.shuffle(buffer)
        yield from buffer

    def _interleaved(self, shards, slot: _Slot, rng: np.random.Generator) -> Iterator[tuple[str, dict[str, bytes]]]:
        """The samples of ``shards``, ``interleave`` of them open at once: each next sample from one of the
        open shards drawn by ``rng``; a shard that runs out is replaced by the next of ``shards``. A function
        of the shards' contents and ``rng`` alone, so the same for every reader given the same ``rng``."""
        if self.interleave <= 1:
            for s in shards:
                yield from self._read_shard(s, slot)
            return
        waiting = iter(shards)
        reading = [self._read_shard(s, slot) for _, s in zip(range(self.interleave), waiting)]
        draws, d = rng.random(1024), 0
        while reading:
            if d == len(draws):
                draws, d = rng.random(1024), 0
            j = int(draws[d] * len(reading))
            d += 1
            item = next(reading[j], None)
            if item is not None:
                yield item
                continue
            s = next(waiting, None)
            if s is None:
                reading.pop(j)
            else:
                reading[j] = self._read_shard(s, slot)

    def _read_shard(self, s: int, slot: _Slot) -> Iterator[tuple[str, dict[str, bytes]]]:
        path, expected = self.shards[s]
        n = 0
        try:
            for item in _iter_tar(path):
                n += 1
                self._seen += 1
                yield item
        except (tarfile.TarError, EOFError, OSError, zlib_error) as e:
            lost = max(expected - n, 1)
            if len(self.shards) < slot.count:  # every reader reads every shard and keeps 1 in slot.count
                lost = max(lost // slot.count, 1)
            self._seen += lost
            self._bad(f"{path.name} is truncated or corrupt after {n} of {expected} samples ({type(e).__name__}: {e})",
                      lost, slot)

    def _decode(self, key: str, group: dict[str, bytes], slot: _Slot) -> dict[str, Any] | None:
        try:
            sample = decode_sample(key, group, self.text_names)
        except (KeyError, ValueError, OSError, EOFError) as e:  # a member missing or unreadable
            self._bad(f"sample {key!r} cannot be decoded ({type(e).__name__}: {e})", 1, slot)
            return None
        problem = self.check.problem(sample) if self.check is not None else None
        if problem:
            self._bad(f"sample {key!r} {problem}", 1, slot)
            return None
        return sample

    def _epoch_size(self, epoch: int, slot: _Slot) -> int:
        """Samples ``slot`` reads in ``epoch``, from the manifest's counts alone."""
        if len(self.shards) >= slot.count:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.shards))
            return sum(self.shards[s][1] for s in order[slot.index :: slot.count])
        return len(range(slot.index, sum(c for _, c in self.shards), slot.count))

    def _samples(self, slot: _Slot, skip: int) -> Iterator[tuple[str, dict[str, bytes]]]:
        """The slot's endless sample stream, minus its first ``skip`` samples."""
        epoch = 0
        while True:
            per_epoch = self._epoch_size(epoch, slot)
            if per_epoch == 0:
                raise ShardError(f"{self.data_dir}: no samples for data slot {slot.index} of {slot.count}")
            if skip >= per_epoch:  # skip whole epochs without reading them
                skip -= per_epoch
                epoch += 1
                continue
            for item in self._epoch_samples(epoch, slot):
                if skip:
                    skip -= 1
                    continue
                yield item
            epoch += 1

    def _emit(self, batch: list[dict[str, Any]], role: int, position: int | None = None) -> dict[str, Any]:
        out = collate(batch, self.text_length)
        out["bad_samples"] = self.bad_samples
        if position is not None:  # samples this role has read: the exact resume point
            out["position"] = (role, position)
        if torch.utils.data.get_worker_info() is None:
            self._produced += 1
            if position is not None:
                self.start_positions[role] = position
        return out

    def __iter__(self) -> Iterator[dict[str, Any]]:
        slot, workers, role = self._slot()
        done = max(0, math.ceil((self.start_batch - role) / workers))  # batches this role already produced
        if self.bucketed:
            yield from self._bucketed(slot, done, role)
            return
        read = self.start_positions.get(role, done * self.batch_size)  # without bad samples the two agree
        batch = []
        for key, group in self._samples(slot, read):
            read += 1
            sample = self._decode(key, group, slot)
            if sample is not None:
                batch.append(sample)
            if len(batch) == self.batch_size:
                yield self._emit(batch, role, read)
                batch = []

    def _bucketed(self, slot: _Slot, done: int, role: int) -> Iterator[dict[str, Any]]:
        """Fill one list per bucket; a full list is a batch. Resuming replays the stream reading only
        each sample's JSON until ``done`` batches have been formed (their samples are dropped): exact
        whatever was skipped, since a bad sample only leaves its batch one short."""
        pending: dict[tuple, list] = {}
        formed = 0
        for key, group in self._samples(slot, 0):
            try:
                bucket = tuple(json.loads(group["json"]).get("bucket") or ())
            except (KeyError, ValueError) as e:
                self._bad(f"sample {key!r} has no readable metadata ({type(e).__name__})", 1, slot)
                continue
            members = pending.setdefault(bucket, [])
            members.append((key, group))
            if len(members) < self.batch_size:
                continue
            pending[bucket] = []
            formed += 1
            if formed <= done:
                continue
            batch = [x for x in (self._decode(k, g, slot) for k, g in members) if x is not None]
            if batch:
                yield self._emit(batch, role)
