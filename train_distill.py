"""Distillation entry point: `python train_distill.py stage.init_from=TEACHER_CKPT [overrides]`; see configs/distill.yaml."""
from training import signals

signals.catch()  # before the slow imports: a pre-emption while starting still ends in exit 75

import hydra  # noqa: E402

from training.trainer import main as run_stage  # noqa: E402


@hydra.main(version_base="1.3", config_path="configs", config_name="distill")
def main(cfg) -> None:
    run_stage(cfg)


if __name__ == "__main__":
    main()
