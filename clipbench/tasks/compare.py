"""``evaluate.py task=compare data_list=[...]``: the zero-shot task's multi-model mode on several
datasets, and accuracy and silhouette per model across them (experiment 1 of Sun et al., NeurIPS 2025:
do purer features, e.g. LaCLIP's, classify and separate better than CLIP's?).

Each dataset's ``data`` config is composed as ``data=<name>`` would compose it, with the run's other
overrides, so dataset defaults (root under ``paths.data_dir``, decode size) and the user's ``data.*``
options both apply. A dataset whose files cannot be found is skipped with its reason.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import MissingConfigException
from omegaconf import DictConfig, open_dict

from clipbench import plots, runs
from clipbench.config import ConfigError
from clipbench.data.sources import DataError
from clipbench.embeddings import EvalDataModule
from clipbench.models.backbone import ImageSpec
from clipbench.tasks import zeroshot

log = logging.getLogger(__name__)

COLUMNS = {"accuracy": "acc1", "silhouette": "silhouette"}  # column of the tables -> zero-shot metric


def _compose(overrides: list[str]) -> DictConfig:
    """``conf/evaluate.yaml`` with ``overrides``: inside a Hydra app through its own search path,
    elsewhere (tests, notebooks) from the repository's ``conf/``."""
    if GlobalHydra.instance().is_initialized():
        return compose(config_name="evaluate", overrides=overrides)
    with initialize_config_dir(config_dir=str(runs.REPO_ROOT / "conf"), version_base="1.3"):
        return compose(config_name="evaluate", overrides=overrides)


def dataset_configs(cfg: DictConfig, names: Sequence[str]) -> dict[str, DictConfig]:
    """name -> a copy of ``cfg`` whose ``data`` is what ``data=<name>`` with the run's other overrides gives."""
    overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    parsed = OverridesParser.create().parse_overrides(overrides)
    kept = [o.input_line for o in parsed if o.key_or_group not in ("data", "data_list")]
    configs = {}
    for name in names:
        try:
            data = _compose([*kept, f"data={name}"]).data
        except MissingConfigException as err:
            raise ConfigError(f"data_list: {name!r} is not a data config (conf/data/<name>.yaml): {err}") from err
        configs[name] = copy.deepcopy(cfg)
        with open_dict(configs[name]):
            configs[name].data = data  # its ${paths.*} and ${seed} now resolve against this run's config
    return configs


def unloadable(data_cfg: DictConfig) -> str | None:
    """Why the test split of ``data_cfg`` cannot be read (its file index, nothing decoded), or None."""
    try:
        EvalDataModule.from_config(data_cfg, ImageSpec(224)).dataset("test")  # the resolution does not matter for the index
    except DataError as err:
        return str(err)
    return None


def acc_ss_table(metrics: Mapping[str, float], models: Sequence[str]) -> pd.DataFrame:
    """One row per model: accuracy and silhouette, from the zero-shot task's metric keys."""
    prefix = (lambda name: f"{name}/") if len(models) > 1 else (lambda name: "")
    rows = [{"model": name, **{column: metrics[f"{prefix(name)}test/{key}"] for column, key in COLUMNS.items()}} for name in models]
    return pd.DataFrame(rows)


def summary_table(per_dataset: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """One row per model: the mean accuracy and silhouette over the datasets, then each dataset's."""
    long = pd.concat([table.assign(dataset=name) for name, table in per_dataset.items()], ignore_index=True)
    summary = long.groupby("model", sort=False)[list(COLUMNS)].mean()
    summary.insert(0, "datasets", long.groupby("model", sort=False)["dataset"].count())
    wide = long.pivot(index="model", columns="dataset", values=list(COLUMNS))
    wide.columns = [f"{dataset}/{column}" for column, dataset in wide.columns]
    in_order = [f"{dataset}/{column}" for dataset in per_dataset for column in COLUMNS]  # data_list's order
    return summary.join(wide[in_order]).reset_index()


def run(cfg: DictConfig, models: Mapping[str, DictConfig], out: Path) -> dict[str, float]:
    names = list(cfg.data_list) or [cfg.data.name]
    configs = dataset_configs(cfg, names)
    skipped = {name: reason for name, dataset_cfg in configs.items() if (reason := unloadable(dataset_cfg.data))}
    for name, reason in skipped.items():
        log.warning("compare: skipping %s: %s", name, reason)
    pd.DataFrame({"dataset": list(skipped), "reason": list(skipped.values())}).to_csv(out / "skipped.csv", index=False)
    if len(skipped) == len(configs):
        raise DataError(f"data_list={names}: no dataset could be loaded (see skipped.csv): {skipped}")
    per_dataset, metrics = {}, {}
    single = "" if len(models) > 1 else f"{next(iter(models))}/"  # zero-shot keys name the model only when there are several
    for name, dataset_cfg in configs.items():
        if name in skipped:
            continue
        log.info("compare: %s", name)
        dataset_metrics = zeroshot.run(dataset_cfg, models, out)
        per_dataset[name] = acc_ss_table(dataset_metrics, list(models))
        per_dataset[name].to_csv(out / f"{name}_full_feature_acc_ss.csv", index=False)
        metrics |= {f"{name}/{single}{key}": value for key, value in dataset_metrics.items()}
    summary = summary_table(per_dataset)
    summary.to_csv(out / "summary.csv", index=False)
    plots.bar_chart(summary, "model", list(COLUMNS), out / "summary.png", title=f"zero-shot, mean over {len(per_dataset)} datasets")
    log.info("compare (skipped: %s):\n%s", sorted(skipped) or "none", summary.to_string(index=False))
    metrics |= {f"{row['model']}/mean/{column}": row[column] for _, row in summary.iterrows() for column in COLUMNS}
    return metrics
