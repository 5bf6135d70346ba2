import numpy as np
import pytest
import torch

from data.evaluator import attribute_accuracy, class_accuracy, classify, evaluate_image
from data.shapes import BACKGROUNDS, CLASSES, COLOURS, SHAPES, SIZES, ShapeSpec, make_sample, render
from data.shards import (
    ShardError,
    ShardStream,
    ShardWriter,
    check_manifest,
    read_manifest,
)


def test_dataset_covers_every_attribute():
    rng = np.random.default_rng(0)
    metas = [make_sample(rng)[1] for _ in range(600)]
    for key, values in [("shape", SHAPES), ("colour", COLOURS), ("size", SIZES), ("background", BACKGROUNDS)]:
        assert {m["attributes"][key] for m in metas} == set(values)
    assert {m["label"] for m in metas} == set(range(len(CLASSES)))
    assert all(m["caption"].split()[1:4] == [m["attributes"]["size"], m["attributes"]["colour"], m["attributes"]["shape"]] for m in metas)


@pytest.mark.parametrize("size", [16, 32, 64])
def test_evaluator_reads_every_rendered_sample(size):
    rng = np.random.default_rng(1)
    images, attrs = zip(*[(img, meta["attributes"]) for img, meta in (make_sample(rng, size, size) for _ in range(1000))])
    acc = attribute_accuracy(list(images), list(attrs))
    # at 16 px a small circle is 8 pixels wide: a few anti-aliased ones read as squares (measured 6 in 4000)
    assert acc["all"] >= (0.995 if size == 16 else 1.0), acc
    # also from the [-1, 1] float tensors the sampler produces
    t = torch.from_numpy(np.stack(images[:50])).permute(0, 3, 1, 2).float() / 127.5 - 1
    labels = [CLASSES.index((a["shape"], a["colour"])) for a in attrs[:50]]
    assert class_accuracy(t, labels) == 1.0


def test_evaluator_rejects_blank_and_blurry_images():
    assert classify(np.full((32, 32, 3), 110, np.uint8)) is None  # nothing drawn
    noise = np.random.default_rng(0).integers(0, 255, (32, 32, 3)).astype(np.uint8)
    assert classify(noise) is None  # static is not a shape
    spec = ShapeSpec("square", "red", "large", "black", 0.5, 0.5)
    two = render(spec)
    two[:, :8] = two[:, 16:24]  # a second blob widens the box: not a clean shape
    assert evaluate_image(two)["shape"] is None


def test_shard_roundtrip_and_manifest(tmp_path):
    rng = np.random.default_rng(0)
    with ShardWriter(tmp_path / "s", samples_per_shard=4, manifest_fields={"autoencoder": "none"}) as w:
        lat = [rng.standard_normal((3, 4, 4)).astype(np.float16) for _ in range(10)]
        for i, x in enumerate(lat):
            w.write(f"k{i:03d}", x, {"label": i % 3, "caption": f"c{i}"})
    m = read_manifest(tmp_path / "s")
    assert m["num_samples"] == 10 and [s["num_samples"] for s in m["shards"]] == [4, 4, 2]
    assert m["latent_shape"] == [3, 4, 4]
    assert not list((tmp_path / "s").glob("*.tmp"))
    batches = iter(ShardStream(tmp_path / "s", batch_size=10, shuffle_buffer=0))
    b = next(batches)
    assert b["keys"] == [f"k{i:03d}" for i in range(10)] or sorted(b["keys"]) == [f"k{i:03d}" for i in range(10)]
    for key, x in zip(b["keys"], b["latent"]):
        torch.testing.assert_close(x, torch.from_numpy(lat[int(key[1:])]).float())
    assert b["label"].tolist() == [int(k[1:]) % 3 for k in b["keys"]]
    with pytest.raises(ValueError, match="must not contain"):
        ShardWriter(tmp_path / "t").write("a.b", lat[0], {})


def test_manifest_mismatch_and_missing_dir_are_clear(tmp_path, shapes_dir):
    m = read_manifest(shapes_dir)
    with pytest.raises(ShardError, match=r"latent_shape: config expects \[16, 32, 32\], shards have \[3, 16, 16\]"):
        check_manifest(m, {"latent_shape": [16, 32, 32], "autoencoder": "none"})
    with pytest.raises(ShardError, match="does not exist"):
        read_manifest(tmp_path / "nowhere")


def _keys(stream, n_batches):
    it = iter(stream)
    return [k for _ in range(n_batches) for k in next(it)["keys"]]


@pytest.mark.parametrize("workers", [0, 2])
def test_ranks_and_workers_read_disjoint_samples(shapes_dir, workers):
    per_rank = []
    for rank in range(2):
        ds = ShardStream(shapes_dir, batch_size=50, rank=rank, world_size=2, seed=3, shuffle_buffer=64)
        loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers)
        per_rank.append(_keys(loader, 20))  # 1000 samples each = one epoch of 2000 in total
    a, b = set(per_rank[0]), set(per_rank[1])
    assert len(a) == len(per_rank[0]) == 1000 and len(b) == 1000
    assert not a & b
    assert len(a | b) == 2000


def test_epochs_are_reshuffled_and_deterministic(shapes_dir):
    ds = ShardStream(shapes_dir, batch_size=100, seed=0, shuffle_buffer=200)
    keys = _keys(ds, 40)  # two epochs
    first, second = keys[:2000], keys[2000:]
    assert sorted(first) == sorted(second) and first != second
    assert keys == _keys(ShardStream(shapes_dir, batch_size=100, seed=0, shuffle_buffer=200), 40)
    assert keys != _keys(ShardStream(shapes_dir, batch_size=100, seed=1, shuffle_buffer=200), 40)


@pytest.mark.parametrize("workers,k", [(0, 7), (0, 27), (2, 7), (2, 30)])
def test_resume_position_continues_the_same_stream(shapes_dir, workers, k):
    def loader(start):
        ds = ShardStream(shapes_dir, batch_size=64, seed=5, shuffle_buffer=128, start_batch=start)
        return torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers)

    full = _keys(loader(0), k + 5)
    resumed = _keys(loader(k), 5)
    assert resumed == full[k * 64 :]
