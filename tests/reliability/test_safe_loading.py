"""A crafted pickle in a checkpoint never runs: the trainer and the sampler refuse it."""
import pickle

import pytest

from conftest import compose, tiny_overrides
from inference.pipeline import load_model
from models.checkpoint import CheckpointError, latest_checkpoint
from training.trainer import train


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # unpickling this calls open(marker, "w"): proof that code ran
        return (open, (str(self.marker), "w"))


@pytest.fixture
def trained(tmp_path, shapes_dir):
    train(compose(tiny_overrides(tmp_path, shapes_dir)))
    return latest_checkpoint(tmp_path / "run" / "checkpoints")


def test_trainer_refuses_a_pickle_payload_in_train_state(tmp_path, shapes_dir, trained):
    # a torch archive whose pickle would run code: weights_only refuses it, nothing runs
    import torch

    marker = tmp_path / "pwned"
    torch.save({"optimizer": Payload(marker), "step": 6}, trained / "train_state.pt")
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="cannot be loaded safely"):
        train(compose(tiny_overrides(tmp_path, shapes_dir, **{"train.max_steps": 8})))
    assert not marker.exists()


def test_trainer_skips_a_raw_pickle_in_place_of_train_state(tmp_path, shapes_dir, trained, capsys):
    # not a torch archive at all: resume=auto names it and takes the older checkpoint
    marker = tmp_path / "pwned"
    (trained / "train_state.pt").write_bytes(pickle.dumps({"optimizer": Payload(marker), "step": 6}))
    summary = train(compose(tiny_overrides(tmp_path, shapes_dir, **{"train.max_steps": 8})))
    out = capsys.readouterr().out
    assert not marker.exists()
    assert "skipping" in out and "step_0000006: train_state.pt cannot be read" in out
    assert "step_0000003 at step 3" in out and summary["steps_this_run"] == 5


@pytest.mark.parametrize("ema", [True, False])
def test_sampler_refuses_a_pickle_in_place_of_weights(tmp_path, trained, ema):
    marker = tmp_path / "pwned"
    name = "ema.safetensors" if ema else "model.safetensors"
    (trained / name).write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_model(trained, use_ema=ema)
    assert not marker.exists()


def test_sampler_loads_a_good_checkpoint(trained):
    model, ae, meta = load_model(trained)
    assert meta["step"] == 6 and type(model).__name__ == "CCDiT" and not model.training
