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
    marker = tmp_path / "pwned"
    (trained / "train_state.pt").write_bytes(pickle.dumps({"optimizer": Payload(marker), "step": 6}))
    with pytest.raises(CheckpointError, match="cannot be loaded safely"):
        train(compose(tiny_overrides(tmp_path, shapes_dir, **{"train.max_steps": 8})))
    assert not marker.exists()


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
