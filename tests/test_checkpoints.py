"""Checkpoint policy: last.ckpt is written when the options say and always at the end; the best
checkpoint holds only weights; a test of the best weights needs a best checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import compose_config
from lightning.pytorch import Callback

from clipbench.config import ConfigError, validate
from clipbench.training import train

TINY = [
    "experiment=quickstart",
    "model.backbone.embed_dim=32",
    "model.backbone.text_width=32",
    "model.backbone.text_layers=1",
    "model.backbone.image_tower.widths=[16,32,32]",
    "data.batch_size=64",
    "+trainer.limit_train_batches=5",
    "+trainer.limit_val_batches=2",
    "+trainer.limit_test_batches=1",
    "logger=none",
    "trainer.enable_progress_bar=false",
    "~callbacks.prediction_grid",
    "~callbacks.epoch_history",
]


class LastCheckpointWatcher(Callback):
    """Records, at the start of every training batch, the global step stored in ``last.ckpt`` (None:
    no file yet) into ``record`` (JSON). Added to a run by config, as any callback."""

    def __init__(self, checkpoint: str, record: str) -> None:
        self.checkpoint, self.record, self.seen = Path(checkpoint), Path(record), []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.seen.append(_step_in(self.checkpoint) if self.checkpoint.exists() else None)
        self.record.write_text(json.dumps(self.seen))


def _step_in(path: Path) -> int:
    return torch.load(path, weights_only=True, map_location="cpu")["global_step"]


def _train_watching(tmp_path: Path, cache_dir: Path, overrides: list[str]) -> tuple[dict, list]:
    watch = [
        f"+callbacks.watcher._target_={__name__}.LastCheckpointWatcher",
        f"+callbacks.watcher.checkpoint={tmp_path / 'checkpoints' / 'last.ckpt'}",
        f"+callbacks.watcher.record={tmp_path / 'seen.json'}",
    ]
    metrics = train(compose_config("train", [*TINY, *overrides, *watch], tmp_path, cache_dir))
    return metrics, json.loads((tmp_path / "seen.json").read_text())


def test_last_checkpoint_every_n_steps_and_once_more_at_the_end(tmp_path, cache_dir):
    overrides = ["trainer.max_epochs=1", "callbacks.last_checkpoint.every_n_train_steps=2", "test_ckpt=last"]
    metrics, seen = _train_watching(tmp_path, cache_dir, overrides)
    assert metrics["steps"] == 5
    assert seen == [None, None, 2, 2, 4]  # written after steps 2 and 4 ...
    assert _step_in(tmp_path / "checkpoints" / "last.ckpt") == 5  # ... and at the end


def test_last_checkpoint_only_at_the_end(tmp_path, cache_dir):
    overrides = ["trainer.max_epochs=2", "callbacks.last_checkpoint.every_n_epochs=0", "callbacks.model_checkpoint=null", "test_ckpt=last"]
    metrics, seen = _train_watching(tmp_path, cache_dir, overrides)
    assert seen == [None] * 10  # nothing during the two epochs
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert last["global_step"] == metrics["steps"] == 10
    assert last["optimizer_states"]  # resumable: the full training state
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["last.ckpt"]  # no best kept
    assert "val/acc1_best" not in metrics


def test_last_checkpoint_every_epoch_and_the_best_weights_only(tmp_path, cache_dir):
    metrics, seen = _train_watching(tmp_path, cache_dir, ["trainer.max_epochs=2", "test_ckpt=best"])
    assert seen == [None] * 5 + [5] * 5
    (best,) = (tmp_path / "checkpoints").glob("best-epoch*.ckpt")
    best_ckpt = torch.load(best, weights_only=True, map_location="cpu")
    assert "optimizer_states" not in best_ckpt and best_ckpt["state_dict"]
    assert best.stat().st_size < (tmp_path / "checkpoints" / "last.ckpt").stat().st_size
    assert metrics["val/acc1_best"] == pytest.approx(max(metrics["val/acc1"], metrics["val/acc1_best"]))


def test_testing_the_best_weights_without_a_best_checkpoint_is_refused(tmp_path):
    cfg = compose_config("train", ["experiment=quickstart", "callbacks.model_checkpoint=null", "test_ckpt=best"], tmp_path, tmp_path)
    with pytest.raises(ConfigError, match=r"callbacks\.model_checkpoint"):
        validate(cfg)
