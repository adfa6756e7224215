"""Sweeps and scale-out: Optuna searches, SLURM submission through submitit, DDP children inside a
multirun, and the few private library attributes clipbench reads (each checked here, so a library
release that renames one fails loudly)."""

from __future__ import annotations

import json
import os
import stat

import pytest
import yaml
from conftest import compose_config, run_script
from hydra.utils import instantiate
from lightning.fabric.plugins.environments import LightningEnvironment
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher
from PIL import Image

from clipbench.data import sources
from clipbench.hydra_ddp import child_argv


def test_ddp_children_compose_the_same_config_as_their_job():
    argv = ["train.py", "-m", "-cn", "mine", "--config-dir=/extra", "-cp", "conf", "model.lr=1e-3,2e-3", "seed=1"]
    assert child_argv(argv, ["model.lr=2e-3", "seed=1"]) == [
        "train.py",
        "-cn",
        "mine",
        "--config-dir=/extra",
        "-cp",
        "conf",
        "model.lr=2e-3",
        "seed=1",
    ]


def test_lightning_still_keeps_its_launched_ranks_where_clipbench_reads_them():
    launcher = _SubprocessScriptLauncher(LightningEnvironment(), num_processes=2, num_nodes=1)
    assert launcher.procs == []  # clipbench.hydra_ddp.launched_ranks reads this list


def _image(path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4)).save(path)


def test_torchvision_file_lists_are_read_where_clipbench_expects_them(tmp_path):
    """Food-101, DTD and Oxford Pets in torchvision's on-disk layouts, a few files each."""
    food = tmp_path / "food" / "food-101"
    (food / "meta").mkdir(parents=True)
    (food / "meta" / "test.json").write_text(json.dumps({"apple_pie": ["apple_pie/1"], "baklava": ["baklava/2"]}))
    for name in ("apple_pie/1", "baklava/2"):
        _image(food / "images" / f"{name}.jpg")
    dtd = tmp_path / "dtd" / "dtd" / "dtd"
    (dtd / "labels").mkdir(parents=True)
    (dtd / "labels" / "test1.txt").write_text("banded/banded_0001.jpg\nzigzagged/zigzagged_0001.jpg\n")
    for name in ("banded/banded_0001", "zigzagged/zigzagged_0001"):
        _image(dtd / "images" / f"{name}.jpg")
    pets = tmp_path / "pets" / "oxford-iiit-pet"
    (pets / "annotations").mkdir(parents=True)
    (pets / "annotations" / "test.txt").write_text("Abyssinian_1 1 1 1\nbeagle_2 2 2 1\n")
    for name in ("Abyssinian_1", "beagle_2"):
        _image(pets / "images" / f"{name}.jpg")

    for load, root, classes in [
        (sources.food101, tmp_path / "food", ["apple_pie", "baklava"]),
        (sources.dtd, tmp_path / "dtd", ["banded", "zigzagged"]),
        (sources.oxford_pets, tmp_path / "pets", ["Abyssinian", "Beagle"]),
    ]:
        listed = load(root, "test", download=False)
        assert listed.classes == classes
        assert [label for _, label in listed.samples] == [0, 1]
        assert all(os.path.isfile(path) for path, _ in listed.samples)


def test_slurm_launcher_submits_one_task_per_device_on_every_node(tmp_path, monkeypatch):
    """The submitit launcher's parameters, rendered by submitit into the sbatch script it would submit.
    submitit refuses to build a SLURM executor where no ``srun`` exists; a stand-in on PATH (never run)
    lets it build one here."""
    cfg = compose_config(
        "train",
        ["launcher=slurm", "trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2", "hydra.launcher.partition=gpu"],
        tmp_path,
        tmp_path,
        keep_hydra=True,
    )
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (2, 4, 4)

    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
    from omegaconf import OmegaConf

    fake = tmp_path / "bin" / "srun"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    # As the launcher does: its generic parameters as they are, the others prefixed for the SLURM executor.
    generic = set(OmegaConf.structured(BaseQueueConf).keys())
    params = {
        k if k in generic else f"slurm_{k}": v for k, v in launcher.items() if k not in ("_target_", "submitit_folder", "max_num_timeout")
    }
    executor = submitit.AutoExecutor(cluster="slurm", folder=tmp_path / "submitit")
    executor.update_parameters(**params)  # raises on any parameter submitit does not know
    script = executor._executor._make_submission_file_text("python train.py", "uid")
    for line in ("--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--partition=gpu", "--time=240"):
        assert f"#SBATCH {line}" in script, line


def test_optuna_search_maximises_the_validation_metric(tmp_path):
    sweep = tmp_path / "sweep"
    result = run_script(
        "train.py",
        "hparams_search=quickstart_optuna",
        "experiment=quickstart",
        "data=synthetic",
        "data.synthetic_samples=128",
        "trainer.max_epochs=1",
        "logger=none",
        "trainer.enable_progress_bar=false",
        "model.backbone.embed_dim=32",
        "model.backbone.text_width=32",
        "model.backbone.text_layers=1",
        "model.backbone.image_tower.widths=[16,32,32]",
        "hydra.sweeper.n_trials=2",
        f"hydra.sweep.dir={sweep}",
        f"paths.cache_dir={tmp_path / 'cache'}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    trials = [json.loads((job / "metrics.json").read_text()) for job in sorted(sweep.iterdir()) if (job / "metrics.json").is_file()]
    assert len(trials) == 2
    assert best["best_value"] == pytest.approx(max(t["val/acc1_best"] for t in trials))


@pytest.mark.parametrize("name", ["quickstart_optuna", "cifar10_fast_optuna"])
def test_optuna_searches_hold_out_a_validation_split(name, tmp_path):
    cfg = compose_config(
        "train", [f"hparams_search={name}", f"experiment={name.removesuffix('_optuna')}"], tmp_path, tmp_path, keep_hydra=True
    )
    assert cfg.data.val_fraction > 0 and cfg.optimized_metric.startswith("val/")
    sampler = instantiate(cfg.hydra.sweeper.sampler)
    assert type(sampler).__name__ == "TPESampler"
