"""``evaluate.py task=compare``: the zero-shot task on several datasets, the unloadable ones skipped."""

from __future__ import annotations

import pandas as pd
import pytest
from conftest import compose_config

from clipbench.config import ConfigError
from clipbench.evaluation import evaluate
from clipbench.tasks.compare import dataset_configs


def _two_models(weights) -> list[str]:
    overrides = []
    for name, path in weights.items():
        short = name.rsplit("-", 1)[1]
        overrides += [
            f"+model@task.models.{short}=open_clip",
            f"task.models.{short}.backbone.model_name={name}",
            f"task.models.{short}.backbone.pretrained={path}",
        ]
    return overrides


def test_each_dataset_matches_the_zero_shot_task_and_missing_ones_are_skipped(open_clip_weights, tmp_path):
    models = [*_two_models(open_clip_weights), "task.templates=single", f"paths.data_dir={tmp_path / 'nothing here'}"]
    cfg = compose_config(
        "evaluate", ["task=compare", "data_list=[digits,food101,synthetic]", *models], tmp_path / "run", tmp_path / "cache"
    )
    metrics = evaluate(cfg)

    skipped = pd.read_csv(tmp_path / "run" / "skipped.csv")
    assert list(skipped["dataset"]) == ["food101"] and f"data.root={tmp_path / 'nothing here' / 'food101'}" in skipped["reason"][0]
    per_dataset = {d: pd.read_csv(tmp_path / "run" / f"{d}_full_feature_acc_ss.csv").set_index("model") for d in ("digits", "synthetic")}
    alone = evaluate(compose_config("evaluate", ["data=digits", *models], tmp_path / "digits", tmp_path / "cache"))  # the zero-shot task
    for table in per_dataset.values():
        assert list(table.index) == ["vit", "rn"] and list(table.columns) == ["accuracy", "silhouette"]
    for model in ("vit", "rn"):
        assert per_dataset["digits"].loc[model, "accuracy"] == pytest.approx(alone[f"{model}/test/acc1"], abs=1e-9)
        assert per_dataset["digits"].loc[model, "silhouette"] == pytest.approx(alone[f"{model}/test/silhouette"], abs=1e-9)
        assert metrics[f"digits/{model}/test/acc1"] == pytest.approx(alone[f"{model}/test/acc1"], abs=1e-9)
        assert metrics[f"synthetic/{model}/test/acc1"] == pytest.approx(per_dataset["synthetic"].loc[model, "accuracy"], abs=1e-9)
    summary = pd.read_csv(tmp_path / "run" / "summary.csv").set_index("model")
    for model in ("vit", "rn"):
        assert summary.loc[model, "datasets"] == 2
        for column in ("accuracy", "silhouette"):
            mean = (per_dataset["digits"].loc[model, column] + per_dataset["synthetic"].loc[model, column]) / 2
            assert summary.loc[model, column] == pytest.approx(mean) == metrics[f"{model}/mean/{column}"]
    assert (tmp_path / "run" / "summary.png").stat().st_size > 5_000


def test_datasets_compose_as_data_options_would_with_the_runs_data_overrides(tmp_path):
    cfg = compose_config("evaluate", ["task=compare", "data.eval_batch_size=100", f"paths.data_dir={tmp_path}"], tmp_path, tmp_path)
    configs = dataset_configs(cfg, ["cifar10", "digits"])
    assert configs["cifar10"].data.root == f"{tmp_path}/cifar10" and configs["cifar10"].data.decode_size == 32
    assert configs["digits"].data.decode_size == 8 and configs["digits"].data.root is None
    assert configs["cifar10"].data.eval_batch_size == configs["digits"].data.eval_batch_size == 100
    with pytest.raises(ConfigError, match="data_list: 'imagenet_typo'"):
        dataset_configs(cfg, ["imagenet_typo"])
