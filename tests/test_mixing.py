"""Batches mix classes: shards prepared from class-sorted inputs (data/prepare.py's plan) read by the
loader give about as many distinct classes per batch as a uniform draw; the loader's interleaving of
several shards keeps resume exact, readers disjoint and bad shards counted."""
import statistics
import tarfile

import numpy as np
import pytest
import torch

from data.prepare import plan_units
from data.shards import INTERLEAVE, ShardError, ShardStream, ShardWriter, _Slot, read_manifest

CLASSES, PER_CLASS, PER_SHARD, BATCH = 100, 40, 200, 32  # 4,000 samples in 20 shards of 5 classes when sorted


def _write(folder, units, label=lambda k: int(k[1:4])):
    z = np.zeros((1, 1, 1), np.float16)
    with ShardWriter(folder, len(units[0]), manifest_fields={"autoencoder": "none"}) as w:
        for unit in units:
            for k in unit:
                w.write(k, z, {"label": label(k)})
    return folder


@pytest.fixture(scope="module")
def class_sorted(tmp_path_factory):
    """The same class-sorted inputs cut into shards by prepare's plan: {'sorted': ..., 'permuted': ...}."""
    keys = [f"c{c:03d}_{i:03d}" for c in range(CLASSES) for i in range(PER_CLASS)]  # as prepare lists class folders
    out = {}
    for name, seed in (("sorted", -1), ("permuted", 0)):
        folder = tmp_path_factory.mktemp(name)
        out[name] = _write(folder, plan_units(folder, dict.fromkeys(keys, 0), {}, PER_SHARD, seed))
    return out


def _distinct(folder, interleave, batches=20):
    stream = ShardStream(folder, BATCH, seed=0, shuffle_buffer=PER_SHARD, interleave=interleave)
    return [len(set(b["label"].tolist())) for _, b in zip(range(batches), stream)]


def test_prepared_class_folders_give_batches_of_many_classes(class_sorted):
    uniform = CLASSES * (1 - (1 - 1 / CLASSES) ** BATCH)  # 27.5 distinct classes in 32 uniform draws
    mixed = _distinct(class_sorted["permuted"], INTERLEAVE)
    assert abs(statistics.fmean(mixed) / uniform - 1) < 0.10, (mixed, uniform)
    assert min(mixed) > 0.75 * uniform
    # what the permutation fixes: shards cut in sorted order hold 5 classes each, and batches a few shards' worth
    before = _distinct(class_sorted["sorted"], 1)
    assert statistics.fmean(before) < 0.5 * uniform, before
    assert statistics.fmean(_distinct(class_sorted["sorted"], INTERLEAVE)) > statistics.fmean(before)  # interleaving helps a little


@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory):
    """12 shards of 10 samples (labels = shard index)."""
    units = [[f"s{s:02d}_{i:02d}" for i in range(10)] for s in range(12)]
    return _write(tmp_path_factory.mktemp("tiny"), units, label=lambda k: int(k[1:3]))


def _keys(stream, n):
    return [k for _, b in zip(range(n), stream) for k in b["keys"]]


def test_shards_are_read_several_at_once_and_one_at_a_time_as_before(tiny_shards):
    first = next(iter(ShardStream(tiny_shards, 8, shuffle_buffer=0, interleave=4)))
    assert len({k[:3] for k in first["keys"]}) >= 3  # 8 samples drawn from the 4 open shards
    order = np.random.default_rng([0, 0]).permutation(12)  # epoch 0's shard order
    one = _keys(ShardStream(tiny_shards, 10, shuffle_buffer=0, interleave=1), 12)
    assert one == [f"s{s:02d}_{i:02d}" for s in order for i in range(10)]  # interleave=1: the old reader, shard by shard
    four = _keys(ShardStream(tiny_shards, 10, shuffle_buffer=0, interleave=4), 12)
    assert sorted(four) == sorted(one) and four != one
    assert {k[:3] for k in four[:10]} <= {f"s{s:02d}" for s in order[:4]}  # the first 4 shards of the epoch's order open
    with pytest.raises(ValueError, match="interleave"):
        ShardStream(tiny_shards, 8, interleave=0)


@pytest.mark.parametrize("workers,k", [(0, 5), (0, 16), (2, 7)])
def test_interleaved_stream_resumes_exactly(tiny_shards, workers, k):
    def loader(start):
        ds = ShardStream(tiny_shards, 8, seed=4, shuffle_buffer=12, start_batch=start, interleave=3)
        return torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers)

    full = _keys(loader(0), k + 6)  # 16 + 6 batches of 8: past the end of the first epoch of 120
    assert _keys(loader(k), 6) == full[k * 8:]


def test_interleaved_state_dict_resumes_and_names_another_interleave(tiny_shards):
    want = _keys(ShardStream(tiny_shards, 8, seed=2, shuffle_buffer=12, interleave=5), 10)
    first = ShardStream(tiny_shards, 8, seed=2, shuffle_buffer=12, interleave=5)
    _keys(first, 4)
    state = first.state_dict()
    resumed = ShardStream(tiny_shards, 8, seed=2, shuffle_buffer=12, interleave=5)
    resumed.load_state_dict(state)
    assert _keys(resumed, 6) == want[32:]
    with pytest.raises(ShardError, match="interleave was 5 and is now 1"):
        ShardStream(tiny_shards, 8, seed=2, interleave=1).load_state_dict(state)
    old = {k: v for k, v in state.items() if k != "interleave"}  # a state from before interleaving: one shard at a time
    ShardStream(tiny_shards, 8, seed=2, interleave=1).load_state_dict(old)


@pytest.mark.parametrize("world", [2, 16])  # 2 ranks x 2 workers: whole shards each; 16 slots: more than the 12 shards
def test_interleaved_readers_are_disjoint(tiny_shards, world):
    workers = 2 if world == 2 else 0
    seen = []
    for rank in range(world):
        ds = ShardStream(tiny_shards, 1, rank=rank, world_size=world, seed=1, shuffle_buffer=4, interleave=4)
        slots = workers or 1
        per_rank = sum(ds._epoch_size(0, _Slot(rank * slots + r, world * slots)) for r in range(slots))
        loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers)
        seen += _keys(loader, per_rank)  # one epoch of this rank's readers
    assert len(seen) == len(set(seen)) == 120


def test_a_truncated_shard_is_counted_while_interleaved(tiny_shards, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(tiny_shards, data)
    shard = data / read_manifest(data)["shards"][3]["name"]
    with tarfile.open(shard) as tar:
        cut = tar.getmembers()[9].offset  # the end of the 5th sample's latent, its .json gone: 4 whole samples left
    shard.write_bytes(shard.read_bytes()[:cut])
    stream = ShardStream(data, 6, shuffle_buffer=0, interleave=4, max_bad_fraction=0.5)
    with pytest.warns(UserWarning, match="truncated or corrupt after 4 of 10"):
        keys = _keys(stream, 19)  # one epoch: the 114 readable samples
    assert stream.bad_samples == 6 and len(set(keys)) == 114 == len(keys)
    assert stream._seen == 120  # the epoch's 114 read and 6 lost
