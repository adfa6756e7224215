"""GPU paths (bf16, the gpu trainer, on-device data on CUDA): run only where a GPU exists."""

from __future__ import annotations

import pytest
import torch
from conftest import compose_config

from clipbench.training import train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_gpu_trainer_bf16_fast_dev_run(tmp_path, cache_dir):
    cfg = compose_config("train", ["experiment=quickstart", "trainer=gpu", "trainer.fast_dev_run=true", "logger=none"], tmp_path, cache_dir)
    assert cfg.trainer.precision == "bf16-mixed"
    metrics = train(cfg)
    assert metrics["steps"] == 1


def test_quickstart_learns_in_bf16_on_the_gpu(tmp_path, cache_dir):
    cfg = compose_config("train", ["experiment=quickstart", "trainer=gpu", "trainer.max_epochs=8", "logger=none"], tmp_path, cache_dir)
    assert train(cfg)["test/acc1"] >= 0.90
