"""Evaluate CLIP models:  python evaluate.py task=zeroshot model=open_clip data=cifar10  (see README.md)."""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> float | None:
    from clipbench import runs  # imported here so --help and config errors are instant
    from clipbench.evaluation import evaluate

    return runs.optimized_metric(cfg, evaluate(cfg))


if __name__ == "__main__":
    main()
