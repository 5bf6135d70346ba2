"""Stage 3 entry point: `python train_stage3.py [overrides]`; see configs/stage3.yaml."""
import hydra

from training.trainer import train


@hydra.main(version_base="1.3", config_path="configs", config_name="stage3")
def main(cfg) -> None:
    train(cfg)


if __name__ == "__main__":
    main()
