"""A checkpoint cannot run foreign code; caches are keyed by content, written once and atomically."""

from __future__ import annotations

import threading

import lightning
import numpy as np
import pytest
import torch
from conftest import compose_config
from hydra.errors import InstantiationException
from PIL import Image

from clipbench.data import datamodule as datamodule_module
from clipbench.data.datamodule import CLIPDataModule
from clipbench.evaluation import evaluate
from clipbench.models.backbone import ImageSpec
from clipbench.models.checkpoint import UnsafeConfigError, load_clipbench
from clipbench.modules.contrastive import CLIPTrainingModule


def _checkpoint(path, backbone_config: dict) -> str:
    torch.save(
        {"hyper_parameters": {"backbone": backbone_config}, "state_dict": {}, "pytorch-lightning_version": lightning.__version__}, path
    )
    return str(path)


@pytest.mark.parametrize("nested", [False, True])
def test_a_checkpoint_naming_a_foreign_callable_is_refused_and_runs_nothing(tmp_path, nested):
    secret, stolen = tmp_path / "secret.txt", tmp_path / "stolen.txt"
    secret.write_text("private")
    # Hydra's own blocklist stops os.system, not this.
    payload = {"_target_": "shutil.copyfile", "src": str(secret), "dst": str(stolen)}
    config = {"_target_": "clipbench.models.scratch.ScratchCLIP", "image_tower": payload} if nested else payload
    ckpt = _checkpoint(tmp_path / "evil.ckpt", config)

    with pytest.raises(UnsafeConfigError, match=r"_target_='shutil\.copyfile'"):
        load_clipbench(ckpt)
    with pytest.raises(UnsafeConfigError, match=r"shutil\.copyfile"):
        CLIPTrainingModule.load_from_checkpoint(ckpt, weights_only=True)
    with pytest.raises(InstantiationException, match=r"UnsafeConfigError.*shutil\.copyfile"):  # Hydra wraps it
        evaluate(compose_config("evaluate", [f"ckpt_path={ckpt}"], tmp_path / "run", tmp_path / "cache"))
    assert not stolen.exists()


def test_a_clipbench_checkpoint_loads_with_lightnings_own_loader(quickstart_checkpoint):
    module = CLIPTrainingModule.load_from_checkpoint(quickstart_checkpoint, map_location="cpu", weights_only=True)
    backbone = load_clipbench(quickstart_checkpoint)
    for name, value in backbone.state_dict().items():
        assert torch.equal(module.backbone.state_dict()[name], value), name


# ----------------------------------------------------------------------------- decode cache
def _tree(root, size: int = 12) -> None:
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for name in ("cat", "dog"):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(3):
                Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / f"{i}.png")


class CountingDecode:
    """The real decode, counting its calls."""

    def __init__(self) -> None:
        self.calls, self.real = 0, datamodule_module.decode

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.real(*args, **kwargs)


def test_decoded_tree_is_cached_by_content_and_decoded_once_under_concurrency(tmp_path, monkeypatch):
    _tree(tmp_path / "tree")
    counting = CountingDecode()
    monkeypatch.setattr(datamodule_module, "decode", counting)

    def decoded(results: list) -> None:
        datamodule = CLIPDataModule("imagefolder", ImageSpec(8), root=str(tmp_path / "tree"), cache_dir=str(tmp_path / "cache"))
        results.append(datamodule._decoded(datamodule._load(split="test"), "test"))

    results: list = []
    threads = [threading.Thread(target=decoded, args=(results,)) for _ in range(3)]  # three ranks at once
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert counting.calls == 1  # the first decodes; the others wait on the lock and read its file
    assert all(torch.equal(r.images, results[0].images) for r in results)
    assert [p.suffix for p in (tmp_path / "cache" / "decoded").iterdir() if p.suffix != ".lock"] == [".pt"]  # no temporary file left

    # The same tree read again: from the cache. A file rewritten with other content and size: a new key.
    decoded([])
    assert counting.calls == 1
    Image.fromarray(np.zeros((20, 20, 3), dtype=np.uint8)).save(tmp_path / "tree" / "test" / "cat" / "0.png")
    decoded(results)
    assert counting.calls == 2
    assert not torch.equal(results[-1].images, results[0].images)
