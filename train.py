"""Train a CLIP from scratch:  python train.py experiment=quickstart  (see README.md)."""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float:
    from clipbench.training import train  # imported here so --help and config errors are instant

    return train(cfg)["test/acc1"]


if __name__ == "__main__":
    main()
