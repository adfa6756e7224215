"""Real CIFAR-10 (the JPEG copy): a small CLIP learns it on CPU. Slow: python -m pytest -m slow."""

import pytest
from conftest import CIFAR10, compose_config

from clipbench.training import train

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(3600),
    pytest.mark.skipif(not CIFAR10.is_dir(), reason=f"no CIFAR-10 copy at {CIFAR10}"),
]


def test_small_clip_learns_cifar10_on_cpu(tmp_path, cache_dir):
    overrides = [
        "experiment=cifar10_fast",
        f"data.root={CIFAR10}",
        "trainer.accelerator=cpu",
        "trainer.precision=32-true",
        "trainer.max_epochs=2",
        "model.backbone.image_tower.widths=[32,64,128]",
        "data.batch_size=256",
        "logger=none",
        "trainer.enable_progress_bar=false",
    ]
    metrics = train(compose_config("train", overrides, tmp_path, cache_dir))
    assert metrics["test/acc1"] >= 0.55, metrics  # chance is 0.10
