"""data/prepare.py says what it kept and skipped: small images are kept at a small --size by default, a
run that keeps nothing or skips more than --max-skipped exits non-zero with the counts by reason and
what to change (keeping what it wrote), reruns of a failed run fail again, and --help shows every default."""
import json

import numpy as np
import pytest
from PIL import Image

from data.prepare import main as prepare, parse_args
from data.shards import read_manifest


def _images(folder, n, side, start=0):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(start, start + n):
        rng = np.random.default_rng(i)
        Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(folder / f"img{i:03d}.png")


@pytest.fixture
def small_classes(tmp_path):
    """Two class folders of 32x32 images, 6 in all (a small real dataset's shape)."""
    _images(tmp_path / "in" / "cat", 3, 32)
    _images(tmp_path / "in" / "dog", 3, 32, start=3)
    return tmp_path / "in"


def _run(argv):
    """prepare's summary, or the message it exits with (SystemExit with a message: exit status 1)."""
    try:
        return prepare(["--autoencoder", "none", *argv])
    except SystemExit as e:
        assert isinstance(e.code, str), e.code  # a message, so the exit status is 1
        return e.code


def test_32px_images_at_size_32_are_kept_with_the_default_min_size(small_classes, tmp_path, capsys):
    out = tmp_path / "out"
    summary = _run(["--input", str(small_classes), "--out", str(out), "--size", "32"])
    assert summary["samples_written"] == 6 and summary["skipped"] == {}
    assert summary["totals"] == {"of": "folder", "inputs": 6, "kept": 6, "skipped": {}}
    assert "kept 6 of 6 inputs, skipped 0 in the folder's 1 unit (1 run now)" in capsys.readouterr().out
    assert json.loads((out / "prepare.json").read_text())["settings"]["min_size"] == 16  # recorded as a number
    assert read_manifest(out)["num_samples"] == 6
    assert parse_args(["--input", "x", "--out", "y"]).min_size == 128  # half of --size 256
    assert parse_args(["--input", "x", "--out", "y", "--buckets", "65536", "--bucket-step", "64"]).min_size == 64  # 128x512


def test_a_run_that_keeps_nothing_fails_with_the_counts_and_the_fix(small_classes, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["--input", str(small_classes), "--out", str(out), "--size", "32", "--min-size", "64", "--samples-per-shard", "4"]
    message = _run(argv)
    assert isinstance(message, str)
    assert "kept 0 of 6 inputs, skipped 6 (too small: 6)" in message
    assert "--min-size 64 skipped 6 images of 32x32: lower --min-size (--min-size 32 keeps them all)" in message
    assert "--force" in message and not (out / "manifest.json").exists()  # an empty folder does not look like data
    printed = capsys.readouterr().out
    assert "kept 0 of 6 inputs, skipped 6 (too small: 6) in the folder's 2 units (2 run now)" in printed
    assert '"totals": {"of": "folder", "inputs": 6, "kept": 0, "skipped": {"too small": 6}}' in printed
    # the same command again redoes nothing and fails again: finished units are done, but the folder is still empty
    again = _run(argv)
    assert isinstance(again, str) and "kept 0 of 6 inputs" in again
    assert "in the folder's 2 units (0 run now)" in capsys.readouterr().out
    # other settings are refused, naming the earlier ones and --force; with --force they start afresh
    refused = _run(argv[:-4] + ["--samples-per-shard", "4"])
    assert isinstance(refused, str) and "'min_size': (64, 16)" in refused and "--min-size 64" in refused and "--force" in refused
    fixed = _run(argv[:-4] + ["--samples-per-shard", "4", "--force"])
    assert fixed["samples_written"] == 6 and read_manifest(out)["num_samples"] == 6


def test_more_skipped_than_max_skipped_fails_after_writing_what_it_kept(tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    _images(src, 4, 32)
    _images(src, 6, 8, start=10)  # 8x8: too small at --size 32
    argv = ["--input", str(src), "--out", str(out), "--size", "32", "--samples-per-shard", "3"]
    message = _run(argv)
    assert isinstance(message, str)
    assert "kept 4 of 10 inputs, skipped 6 (too small: 6): 60% of the inputs, more than --max-skipped 0.5" in message
    assert "--min-size 16 skipped 6 images of 8x8: lower --min-size (--min-size 8 keeps them all)" in message
    assert "--max-skipped 0.61" in message  # what accepts them
    manifest = read_manifest(out)  # nothing lost: the kept samples and the manifest are written
    assert manifest["num_samples"] == 4 and manifest["skipped"] == 6 and len(list(out.glob("shard-*.tar"))) == 4
    assert isinstance(_run(argv), str)  # a rerun fails again ...
    accepted = _run([*argv, "--max-skipped", "0.61"])  # ... until told to accept the share: nothing redone
    assert accepted["units_run"] == 0 and accepted["totals"]["kept"] == 4
    assert _run([*argv, "--max-skipped", "0.7"])["totals"] == {"of": "folder", "inputs": 10, "kept": 4, "skipped": {"too small": 6}}


def test_help_shows_every_default(capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    options = text[text.index("options:"):]
    blocks, name = {}, None
    for line in options.splitlines()[1:]:
        if line.startswith("  -"):
            name = line.split()[0].rstrip(",")
            blocks[name] = line
        elif name:
            blocks[name] += " " + line.strip()
    assert {"--min-size", "--samples-per-shard", "--max-skipped", "--shuffle-seed"} <= set(blocks)
    missing = [n for n, b in blocks.items() if "default" not in b and n not in ("-h", "--input", "--out")]
    assert not missing, missing
    assert "(default: half the output's shorter side" in blocks["--min-size"]
    assert "(default: 1000)" in blocks["--samples-per-shard"] and "(default: 0.5)" in blocks["--max-skipped"]
    assert "-1 keeps the sorted order" in blocks["--shuffle-seed"] and "(default: 0)" in blocks["--shuffle-seed"]


def test_units_are_cut_from_a_permutation_and_old_plans_resume(small_classes, tmp_path):
    out = tmp_path / "out"
    _run(["--input", str(small_classes), "--out", str(out), "--size", "32", "--samples-per-shard", "2", "--shuffle-seed", "-1"])
    plan = json.loads((out / "prepare.json").read_text())
    keys = [k for unit in plan["units"] for k in unit]
    assert keys == sorted(keys) and plan["shuffle_seed"] == -1  # -1: the sorted order, class by class
    _run(["--input", str(small_classes), "--out", str(tmp_path / "mixed"), "--size", "32", "--samples-per-shard", "2"])
    mixed = json.loads((tmp_path / "mixed" / "prepare.json").read_text())
    assert mixed["shuffle_seed"] == 0 and sorted(k for u in mixed["units"] for k in u) == keys
    assert [k for u in mixed["units"] for k in u] != keys
    # a plan written before the seed existed resumes, and the inputs added later are permuted into new units
    del plan["shuffle_seed"]
    (out / "prepare.json").write_text(json.dumps(plan))
    before = {p.name: p.read_bytes() for p in out.glob("shard-*.tar")}
    _images(small_classes / "cat", 3, 32, start=20)
    _images(small_classes / "dog", 3, 32, start=30)
    summary = _run(["--input", str(small_classes), "--out", str(out), "--size", "32", "--samples-per-shard", "2"])
    assert summary["units_run"] == 3 and read_manifest(out)["num_samples"] == 12
    assert all((out / name).read_bytes() == data for name, data in before.items())
    after = json.loads((out / "prepare.json").read_text())
    assert after["units"][:3] == plan["units"] and after["shuffle_seed"] == 0
    added = [k for u in after["units"][3:] for k in u]
    assert sorted(added) == sorted(set(after["sizes"]) - set(keys)) and added != sorted(added)


def test_a_class_folder_added_on_a_rerun_keeps_the_earlier_labels(small_classes, tmp_path):
    """'ant' sorts before 'cat' and 'dog': numbered afresh it would relabel the shards already written."""
    from data.shards import _iter_tar

    out = tmp_path / "out"
    argv = ["--input", str(small_classes), "--out", str(out), "--size", "32", "--samples-per-shard", "4"]
    _run(argv)
    _images(small_classes / "ant", 2, 32, start=10)
    _run(argv)
    manifest = read_manifest(out)
    assert manifest["class_names"] == ["cat", "dog", "ant"] and manifest["num_classes"] == 3
    labels = {}
    for shard in manifest["shards"]:
        for _, group in _iter_tar(out / shard["name"]):
            meta = json.loads(group["json"])
            labels[meta["source"]] = meta["label"]
    assert len(labels) == 8
    assert all(labels[s] == {"cat": 0, "dog": 1, "ant": 2}[s.split("/")[0]] for s in labels)
