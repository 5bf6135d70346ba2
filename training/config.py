"""A stage's Hydra config exactly as its entry point (train_stageN.py) would see it, for the
scripts and tests that need one without running the stage; and the error a bad config raises."""
from __future__ import annotations

from pathlib import Path

from training import schema  # noqa: F401  (registers the config groups' types with Hydra)

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


class ConfigError(ValueError):
    """The config asks for something impossible; the message says what to change."""


def compose(stage: str = "stage1", overrides=()):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return hydra_compose(config_name=stage, overrides=list(overrides))
