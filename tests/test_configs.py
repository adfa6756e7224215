"""Every option of every config group composes and instantiates: a broken config fails here, in
seconds, instead of in a user's run. Options are discovered from ``conf/``, so a new file is covered
the day it is added. Models load through their real paths (tiny local models in each source's format)."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from pathlib import Path

import pytest
import torch
from conftest import CIFAR10, ROOT, compose_config
from hydra.utils import get_class, instantiate
from lightning.pytorch import Trainer
from omegaconf import DictConfig, OmegaConf
from test_backbone_laclip import TINY as LACLIP_TINY
from test_backbone_laclip import RefLaCLIP

from clipbench import runs
from clipbench.config import validate
from clipbench.evaluation import TASKS
from clipbench.models.backbone import CLIPBackbone
from clipbench.projections import save_projections
from clipbench.training import build_datamodule, build_module

CONF = ROOT / "conf"
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="trainer=gpu needs a GPU (tests/test_gpu.py runs it there)")


def options(group: str) -> list:
    """The selectable options of a config group (files starting with ``_`` are shared fragments)."""
    names = sorted(p.stem for p in (CONF / group).glob("*.yaml") if not p.stem.startswith("_"))
    return [pytest.param(name, marks=CUDA) if (group, name) == ("trainer", "gpu") else name for name in names]


@pytest.fixture(scope="module")
def pairs_csv(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("pairs") / "pairs.csv"
    image = next((CIFAR10 / "test").glob("*/*.jpg"))
    path.write_text(f"id,image,caption\na,{image},a photo of a cat\n")
    return path


@pytest.fixture(scope="module")
def model_sources(hf_clip_dir, hf_siglip_dir, open_clip_weights, quickstart_checkpoint, tmp_path_factory) -> dict[str, list[str]]:
    """Overrides that point each model option needing weights at a tiny local model in its own format."""
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    laclip = root / "laclip.pt"
    torch.save({"state_dict": RefLaCLIP().state_dict()}, laclip)
    tiny_laclip = [f"model.backbone.{key}={value}" for key, value in LACLIP_TINY.items() if key != "vision_kwargs"]
    tiny_laclip += [f"+model.backbone.vision_kwargs.{key}={value}" for key, value in LACLIP_TINY["vision_kwargs"].items()]
    clipbench = {"_target_": "clipbench.models.checkpoint.load_clipbench", "path": str(quickstart_checkpoint)}
    projections = save_projections(instantiate(clipbench), clipbench, root / "projections.pt")
    return {
        "hf_clip": [f"model.backbone.name_or_path={hf_clip_dir}"],
        "hf_siglip": [f"model.backbone.name_or_path={hf_siglip_dir}"],
        "open_clip": [
            "model.backbone.model_name=clipbench-tiny-vit",
            f"model.backbone.pretrained={open_clip_weights['clipbench-tiny-vit']}",
        ],
        "laclip": [f"model.backbone.checkpoint={laclip}", *tiny_laclip],
        "clipbench": [f"model.backbone.path={quickstart_checkpoint}"],
        "projections": [f"model.backbone.path={projections}"],
    }


def instantiate_targets(node) -> int:
    """Instantiates every ``_target_`` node under ``node`` (tasks keep e.g. samplers as such nodes)."""
    if isinstance(node, Mapping):
        if "_target_" in node:
            instantiate(node)
            return 1
        return sum(instantiate_targets(value) for value in node.values())
    if isinstance(node, list | tuple) or OmegaConf.is_list(node):
        return sum(instantiate_targets(value) for value in node)
    return 0


def build_training(cfg: DictConfig) -> Trainer:
    """What train.py builds before fitting: module, datamodule, loggers, callbacks, trainer."""
    validate(cfg)
    module = build_module(cfg.model)
    assert isinstance(module.backbone, CLIPBackbone)
    build_datamodule(cfg, module.backbone)
    loggers = runs.instantiate_group(cfg.get("logger"))
    return instantiate(cfg.trainer, callbacks=runs.instantiate_group(cfg.callbacks), logger=loggers or False)


@pytest.mark.parametrize("name", options("model"))
def test_model(name, model_sources, tmp_path, cache_dir):
    cfg = compose_config("train", [f"model={name}", *model_sources.get(name, [])], tmp_path, cache_dir)
    backbone = build_module(cfg.model).backbone.eval()
    size = backbone.image_spec.size
    with torch.no_grad():
        features = backbone.encode_image(torch.zeros(2, 3, size, size))
    assert features.shape == (2, backbone.embed_dim)


@pytest.mark.parametrize("name", options("data"))
def test_data(name, pairs_csv, tmp_path, cache_dir):
    required = {"imagefolder": [f"data.root={CIFAR10 / 'test'}"], "pairs": [f"data.input={pairs_csv}"]}
    cfg = compose_config("train", ["experiment=quickstart", f"data={name}", *required.get(name, [])], tmp_path, cache_dir)
    validate(cfg)
    datamodule = build_datamodule(cfg, build_module(cfg.model).backbone)
    assert type(datamodule) is get_class(cfg.data._target_)


@pytest.mark.parametrize("name", options("trainer"))
def test_trainer(name, tmp_path, cache_dir):
    cfg = compose_config("train", [f"trainer={name}"], tmp_path, cache_dir)
    assert isinstance(instantiate(cfg.trainer, logger=False), Trainer)


@pytest.mark.parametrize("name", options("logger"))
def test_logger(name, tmp_path, cache_dir, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = compose_config("train", [f"logger={name}"], tmp_path, cache_dir)
    loggers = runs.instantiate_group(cfg.logger)
    assert len(loggers) == len([key for key in (cfg.logger or {}) if "_target_" in cfg.logger[key]])
    assert len(loggers) == (0 if name == "none" else 1)


@pytest.mark.parametrize("name", options("callbacks"))
def test_callbacks(name, tmp_path, cache_dir):
    cfg = compose_config("train", [f"callbacks={name}"], tmp_path, cache_dir)
    assert len(runs.instantiate_group(cfg.callbacks)) == len(cfg.callbacks)


@pytest.mark.parametrize("name", options("task"))
def test_task(name, tmp_path, cache_dir):
    cfg = compose_config("evaluate", [f"task={name}"], tmp_path, cache_dir)
    assert cfg.task.name == name and name in TASKS
    validate(cfg)
    assert callable(importlib.import_module(TASKS[name]).run)
    instantiate_targets(cfg.task)


@pytest.mark.parametrize("name", options("experiment"))
def test_experiment(name, model_sources, pairs_csv, tmp_path, cache_dir):
    required = {"misalign": [*model_sources["clipbench"], f"data.input={pairs_csv}"]}
    cfg = compose_config("train", [f"experiment={name}", *required.get(name, [])], tmp_path, cache_dir)
    if cfg.trainer.accelerator == "gpu" and not torch.cuda.is_available():  # the rest of a GPU recipe is checked on the CPU
        cfg.trainer.merge_with({"accelerator": "cpu", "precision": "32-true"})
    assert isinstance(build_training(cfg), Trainer)


@pytest.mark.parametrize("name", options("debug"))
def test_debug(name, tmp_path, cache_dir):
    cfg = compose_config("train", ["experiment=quickstart", f"debug={name}"], tmp_path, cache_dir)
    assert isinstance(build_training(cfg), Trainer)


@pytest.mark.parametrize("name", options("hparams_search"))
def test_hparams_search(name, tmp_path, cache_dir):
    cfg = compose_config("train", [f"hparams_search={name}"], tmp_path, cache_dir, keep_hydra=True)
    assert cfg.optimized_metric.startswith("val/")  # never a test metric
    sweeper = instantiate(cfg.hydra.sweeper)
    assert type(sweeper).__name__ == "OptunaSweeper"
    for override in cfg.hydra.sweeper.params:  # every searched key exists in the config it sweeps
        assert OmegaConf.select(cfg, override, default="missing") != "missing", override


@pytest.mark.parametrize("name", options("launcher"))
def test_launcher(name, tmp_path, cache_dir):
    cfg = compose_config("train", [f"launcher={name}", "trainer=ddp"], tmp_path, cache_dir, keep_hydra=True)
    launcher = instantiate(cfg.hydra.launcher)
    assert type(launcher).__module__.startswith("hydra_plugins.")
