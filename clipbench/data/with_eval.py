"""Training on one dataset, zero-shot validation and test on another (``eval_data`` of train.py).

Image-caption pairs have no classes to evaluate zero-shot; a labelled dataset (``data@eval_data=cifar10``)
supplies them. The training module sees one datamodule whose training batches are the pairs and
whose validation and test batches, and ``class_names``, are the labelled dataset's.
"""

from __future__ import annotations

import lightning as L


class WithZeroShotEval(L.LightningDataModule):
    def __init__(self, train: L.LightningDataModule, evaluation: L.LightningDataModule) -> None:
        super().__init__()
        self.train_data, self.eval_data = train, evaluation
        self.seed = getattr(train, "seed", 0)

    @property
    def class_names(self) -> list[str]:
        return self.eval_data.class_names

    def setup(self, stage: str | None = None) -> None:
        for data in (self.train_data, self.eval_data):
            data.trainer = self.trainer  # their loaders read the rank, world size and device from it
            data.setup(stage)

    def train_dataloader(self):
        return self.train_data.train_dataloader()

    def val_dataloader(self):
        return self.eval_data.val_dataloader()

    def test_dataloader(self):
        return self.eval_data.test_dataloader()

    def teardown(self, stage: str) -> None:
        self.train_data.teardown(stage)
        self.eval_data.teardown(stage)
