"""Bad input gets a clear error naming the problem, before any work; a bad image loses nothing else."""

from __future__ import annotations

import pytest
import torch
from conftest import compose_config, run_script
from PIL import Image

from clipbench.config import ConfigError
from clipbench.data.datamodule import CLIPDataModule
from clipbench.data.sources import DataError
from clipbench.models.backbone import ImageSpec
from clipbench.training import train


def _tree(root, counts: dict[str, int], split="train"):
    for name, n in counts.items():
        folder = root / split / name
        folder.mkdir(parents=True)
        for i in range(n):
            Image.fromarray(torch.randint(0, 255, (8, 8, 3), dtype=torch.uint8).numpy()).save(folder / f"{i}.png")


def test_missing_data_directory_names_data_root(tmp_path, cache_dir):
    cfg = compose_config("train", ["data=imagefolder", f"data.root={tmp_path / 'nowhere'}"], tmp_path / "run", cache_dir)
    with pytest.raises(DataError, match=r"data\.root=.*nowhere.*train/"):
        train(cfg)


def test_empty_class_folder_is_named(tmp_path):
    _tree(tmp_path, {"cat": 2, "dog": 0})
    _tree(tmp_path, {"cat": 1, "dog": 1}, split="test")
    with pytest.raises(DataError, match=r"class folder 'dog' has no images"):
        CLIPDataModule("imagefolder", ImageSpec(8), root=str(tmp_path)).setup()


def test_test_split_missing_a_class_is_named(tmp_path):
    _tree(tmp_path, {"cat": 1, "dog": 1})
    _tree(tmp_path, {"cat": 1}, split="test")
    with pytest.raises(DataError, match=r"\['dog'\] are missing"):
        CLIPDataModule("imagefolder", ImageSpec(8), root=str(tmp_path)).setup()


def test_unreadable_image_is_reported_and_the_rest_is_kept(tmp_path, caplog):
    _tree(tmp_path, {"cat": 3, "dog": 3})
    _tree(tmp_path, {"cat": 2, "dog": 2}, split="test")
    (tmp_path / "test" / "dog" / "broken.png").write_bytes(b"not an image")
    for on_device in (True, False):
        datamodule = CLIPDataModule(
            "imagefolder", ImageSpec(8), root=str(tmp_path), val_fraction=0.0, eval_batch_size=16, on_device=on_device
        )
        datamodule.setup()
        _, labels = next(iter(datamodule.test_dataloader()))
        assert len(labels) == 4  # the broken file dropped, all four good images kept
    assert "broken.png" in caplog.text


def test_impossible_values_name_their_key(tmp_path, cache_dir):
    for override, key in [
        ("model.lr=-1", "model.lr"),
        ("data.batch_size=0", "data.batch_size"),
        ("data.val_fraction=1.5", "data.val_fraction"),
    ]:
        cfg = compose_config("train", [override], tmp_path, cache_dir)
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            train(cfg)


def test_cli_reports_unknown_model_and_unknown_key_and_negative_lr(tmp_path):
    unknown_model = run_script("train.py", "model=nope", cwd=tmp_path)
    assert unknown_model.returncode != 0
    assert "Could not find 'model/nope'" in unknown_model.stderr and "clip_vit" in unknown_model.stderr  # lists the options
    unknown_key = run_script("train.py", "model.lrr=1e-3", cwd=tmp_path)
    assert unknown_key.returncode != 0 and "model.lrr" in unknown_key.stderr
    negative_lr = run_script("train.py", "model.lr=-0.001", cwd=tmp_path)
    assert negative_lr.returncode != 0 and "model.lr=-0.001 is invalid" in negative_lr.stderr


def test_validation_split_too_small_for_the_classes_is_named(tmp_path):
    _tree(tmp_path, {"cat": 3, "dog": 3})
    _tree(tmp_path, {"cat": 1, "dog": 1}, split="test")
    with pytest.raises(DataError, match=r"data\.val_fraction=0\.1 holds out 1 of 6"):
        CLIPDataModule("imagefolder", ImageSpec(8), root=str(tmp_path), val_fraction=0.1).setup()
