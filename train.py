"""Train a CLIP from scratch:  python train.py experiment=quickstart  (see README.md)."""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float:
    from clipbench import runs  # imported here so --help and config errors are instant
    from clipbench.training import train

    return runs.optimized_metric(cfg, train(cfg))


if __name__ == "__main__":
    main()
