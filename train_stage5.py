"""Stage 5 entry point: `python train_stage5.py [overrides]`; see configs/stage5.yaml."""
import hydra

from training.trainer import train


@hydra.main(version_base="1.3", config_path="configs", config_name="stage5")
def main(cfg) -> None:
    train(cfg)


if __name__ == "__main__":
    main()
