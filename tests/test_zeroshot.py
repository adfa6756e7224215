"""Zero-shot evaluation: agreement with open_clip and with train.py, the embedding cache, outputs, datasets."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import open_clip
import pandas as pd
import pytest
import torch
from conftest import compose_config
from open_clip.zero_shot_classifier import build_zero_shot_classifier
from PIL import Image
from sklearn.metrics import silhouette_score

from clipbench.config import ConfigError
from clipbench.data.datamodule import CLIPDataModule
from clipbench.data.sources import DataError
from clipbench.data.templates import OPENAI_CIFAR_TEMPLATES
from clipbench.embeddings import EvalDataModule, model_identity
from clipbench.evaluation import evaluate, model_entries
from clipbench.models.backbone import ImageSpec
from clipbench.models.openclip import OpenCLIP
from clipbench.tasks.zeroshot import zeroshot
from clipbench.training import train

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def weights(open_clip_weights) -> dict[str, Path]:
    return open_clip_weights


def _digits(spec: ImageSpec) -> EvalDataModule:
    return EvalDataModule("digits", spec, decode_size=8, eval_batch_size=128)


def _open_clip_model(name: str, weights: dict[str, Path]) -> list[str]:
    return ["model=open_clip", f"model.backbone.model_name={name}", f"model.backbone.pretrained={weights[name]}"]


def test_matches_open_clips_zero_shot_classifier(weights, tmp_path, cache_dir):
    backbone = OpenCLIP("clipbench-tiny-vit", str(weights["clipbench-tiny-vit"]))
    data = _digits(backbone.image_spec)
    result = zeroshot(backbone, data, OPENAI_CIFAR_TEMPLATES)

    # open_clip's own protocol on the same model, templates and preprocessed images
    model, tokenizer = backbone.model, open_clip.get_tokenizer("clipbench-tiny-vit")
    classifier = build_zero_shot_classifier(model, tokenizer, data.class_names, OPENAI_CIFAR_TEMPLATES, device=CPU)
    with torch.no_grad():
        images, labels = zip(*data.eval_batches("test", CPU))
        features = torch.cat([model.encode_image(x, normalize=True) for x in images])
    labels = torch.cat(labels)
    top5 = (features @ classifier).topk(5, dim=-1).indices
    assert torch.equal(result.labels, labels)
    assert torch.equal(result.top5, top5)  # the same ranked predictions for every image, not only the same rates
    assert result.acc1 == pytest.approx((top5[:, 0] == labels).float().mean().item(), abs=1e-6)
    assert result.acc5 == pytest.approx((top5 == labels[:, None]).any(-1).float().mean().item(), abs=1e-6)
    assert result.num_samples == len(labels) == 360

    # evaluate.py's path (the Lightning predict loop) writes the same predictions, as class names
    model_args = _open_clip_model("clipbench-tiny-vit", weights)
    evaluate(compose_config("evaluate", [*model_args, "data=digits", "task.templates=openai_cifar"], tmp_path, cache_dir))
    written = pd.read_csv(tmp_path / "digits_predictions.csv")
    names = np.asarray(result.class_names)
    assert written["label"].tolist() == names[labels.numpy()].tolist()
    for rank in range(5):
        assert written[f"top{rank + 1}"].tolist() == names[top5[:, rank].numpy()].tolist()


def test_checkpoint_reproduces_train_py_test_accuracy(tmp_path, cache_dir):
    fast = [
        "model.backbone.embed_dim=32",
        "model.backbone.text_width=32",
        "model.backbone.text_layers=1",
        "model.backbone.image_tower.widths=[16,32,32]",
        "data.batch_size=64",
        "+trainer.limit_train_batches=2",
        "~callbacks.prediction_grid",
        "~callbacks.epoch_history",
        "trainer.enable_progress_bar=false",
    ]
    overrides = ["experiment=quickstart", "trainer.max_epochs=2", "logger=none", "test_ckpt=last"]
    trained = train(compose_config("train", [*overrides, *fast], tmp_path / "train", cache_dir))
    ckpt = tmp_path / "train" / "checkpoints" / "last.ckpt"
    cfg = compose_config("evaluate", [f"ckpt_path={ckpt}", "data=digits", "task.templates=train"], tmp_path / "eval", cache_dir)
    evaluated = evaluate(cfg)
    for metric in ("acc1", "acc5", "mean_recall"):
        assert evaluated[f"test/{metric}"] == pytest.approx(trained[f"test/{metric}"], abs=1e-6), metric


class CountingOpenCLIP(OpenCLIP):
    """A real backbone that counts its image-encoder calls."""

    calls = 0

    def encode_image(self, images):
        CountingOpenCLIP.calls += 1
        return super().encode_image(images)


def test_second_run_reads_image_embeddings_from_the_cache(weights, tmp_path):
    path = tmp_path / "weights.pt"
    path.write_bytes(weights["clipbench-tiny-vit"].read_bytes())
    config = {"_target_": "CountingOpenCLIP", "model_name": "clipbench-tiny-vit", "pretrained": str(path)}
    backbone = CountingOpenCLIP("clipbench-tiny-vit", str(path))
    data, templates = _digits(backbone.image_spec), ["a photo of a {}."]
    cache = dict(cache_dir=tmp_path / "cache", model_id=model_identity(config))

    first = zeroshot(backbone, data, templates, **cache)
    encoded = CountingOpenCLIP.calls
    assert encoded > 0 and not first.cached and len(list((tmp_path / "cache" / "embeddings").iterdir())) == 1
    second = zeroshot(backbone, data, templates, **cache)
    assert CountingOpenCLIP.calls == encoded and second.cached
    assert torch.equal(second.top5, first.top5)

    # Weights rewritten at the same path (a retrained last.ckpt) are a different model.
    time.sleep(0.01)
    torch.save(open_clip.create_model("clipbench-tiny-vit").state_dict(), path)
    cache["model_id"] = model_identity(config)
    assert not zeroshot(backbone, data, templates, **cache).cached
    assert CountingOpenCLIP.calls > encoded


def test_several_models_side_by_side(weights, tmp_path, cache_dir):
    overrides = ["data=digits", "task.templates=single"]
    for name in weights:
        short = name.rsplit("-", 1)[1]
        overrides += [
            f"+model@task.models.{short}=open_clip",
            f"task.models.{short}.backbone.model_name={name}",
            f"task.models.{short}.backbone.pretrained={weights[name]}",
        ]
    cfg = compose_config("evaluate", overrides, tmp_path, tmp_path / "cache")
    metrics = evaluate(cfg)

    table = pd.read_csv(tmp_path / "digits_zeroshot.csv")
    assert list(table["model"]) == ["vit", "rn"]
    assert list(table.columns[:9]) == [
        "model",
        "dataset",
        "acc1",
        "acc5",
        "mean_recall",
        "silhouette",
        "num_samples",
        "seconds",
        "images_per_s",
    ]
    assert (table["num_samples"] == 360).all() and (table["images_per_s"] > 0).all()
    assert (tmp_path / "digits_zeroshot.png").stat().st_size > 5_000
    assert json.loads((tmp_path / "metrics.json").read_text()) == pytest.approx(metrics)
    assert set(metrics) == {f"{m}/test/{k}" for m in ("vit", "rn") for k in ("acc1", "acc5", "mean_recall", "silhouette")}

    # Per-class recalls average to the mean recall; the silhouette is scikit-learn's on open_clip's own
    # normalised embeddings of the same images (360 < silhouette_samples: no subsampling).
    per_class = pd.read_csv(tmp_path / "digits_per_class.csv")
    assert list(per_class.columns) == ["class", "support", "vit", "rn"] and per_class["support"].sum() == 360
    for model in ("vit", "rn"):
        assert per_class[model].mean() == pytest.approx(metrics[f"{model}/test/mean_recall"], abs=1e-6)
        backbone = OpenCLIP(f"clipbench-tiny-{model}", str(weights[f"clipbench-tiny-{model}"]))
        with torch.no_grad():
            images, labels = zip(*_digits(backbone.image_spec).eval_batches("test", CPU), strict=True)
            features = torch.cat([backbone.model.encode_image(x, normalize=True) for x in images])
        expected = silhouette_score(features.numpy(), torch.cat(labels).numpy(), metric="cosine")
        assert metrics[f"{model}/test/silhouette"] == pytest.approx(expected, abs=1e-4)


def test_silhouette_of_separated_classes_is_near_one():
    from clipbench.tasks.zeroshot import silhouette

    centres = torch.eye(4, 8) * 10
    labels = torch.arange(4).repeat_interleave(50)
    features = centres[labels] + 0.1 * torch.randn(200, 8, generator=torch.Generator().manual_seed(0))
    assert silhouette(features, labels, max_samples=100, seed=0) > 0.9
    assert math.isnan(silhouette(features, torch.zeros(200, dtype=torch.long), max_samples=100, seed=0))


def test_user_json_of_templates_and_class_names(weights, tmp_path):
    names = [f"digit {i}" for i in range(10)]
    templates = ["a handwritten {}.", "the number {}."]
    spec = tmp_path / "prompts.json"
    spec.write_text(json.dumps({"templates": templates, "classnames": names}))
    overrides = [*_open_clip_model("clipbench-tiny-vit", weights), f"task.templates={spec}", f"task.class_names={spec}"]
    metrics = evaluate(compose_config("evaluate", overrides, tmp_path, tmp_path / "cache"))

    assert list(pd.read_csv(tmp_path / "digits_per_class.csv")["class"]) == names
    backbone = OpenCLIP("clipbench-tiny-vit", str(weights["clipbench-tiny-vit"]))
    expected = zeroshot(backbone, _digits(backbone.image_spec), templates, class_names=names)
    assert metrics["test/acc1"] == pytest.approx(expected.acc1, abs=1e-6)
    assert metrics["test/acc5"] == pytest.approx(expected.acc5, abs=1e-6)

    spec.write_text(json.dumps({"templates": templates, "classnames": names[:3]}))
    with pytest.raises(ConfigError, match=r"task\.class_names"):
        evaluate(compose_config("evaluate", overrides, tmp_path, tmp_path / "cache"))


def test_ckpt_path_is_shorthand_for_the_clipbench_model(tmp_path):
    cfg = compose_config("evaluate", ["ckpt_path=some/last.ckpt"], tmp_path, tmp_path)
    assert model_entries(cfg)["clipbench"].backbone.path == "some/last.ckpt"
    with pytest.raises(ConfigError, match="ckpt_path"):
        model_entries(compose_config("evaluate", ["ckpt_path=some/last.ckpt", "model=open_clip"], tmp_path, tmp_path))
    with pytest.raises(ConfigError, match=r"model\.backbone\.path must be set .*ckpt_path="):
        model_entries(compose_config("evaluate", [], tmp_path, tmp_path))


TORCHVISION = ["food101", "caltech101", "oxford_pets", "stl10", "dtd", "eurosat", "fashion_mnist"]


@pytest.mark.parametrize("name", TORCHVISION)
def test_torchvision_dataset_without_a_local_copy_fails_fast_naming_data_root(name, tmp_path):
    started = time.perf_counter()
    with pytest.raises(DataError, match=f"data.root={tmp_path}") as error:
        CLIPDataModule(name, ImageSpec(32), root=str(tmp_path), download=False).setup()
    assert "data.download=true" in str(error.value)
    assert time.perf_counter() - started < 5


def test_eurosat_split_is_fixed_stratified_and_rgb(tmp_path):
    """torchvision's EuroSAT layout, faked with a few tiles: a disjoint 80/20 split, the same every time."""
    for c, cls in enumerate(["Forest", "River"]):
        folder = tmp_path / "eurosat" / "2750" / cls
        folder.mkdir(parents=True)
        for i in range(10):
            Image.fromarray(np.full((64, 64, 3), 40 * c + i, np.uint8)).save(folder / f"{cls}_{i}.jpg")
    train_set = EvalDataModule("eurosat", ImageSpec(32), root=str(tmp_path)).dataset("train")
    test_set = EvalDataModule("eurosat", ImageSpec(32), root=str(tmp_path)).dataset("test")
    again = EvalDataModule("eurosat", ImageSpec(32), root=str(tmp_path), seed=7).dataset("test")
    assert len(train_set) == 16 and len(test_set) == 4 and test_set.labels.tolist() == [0, 0, 1, 1]
    assert not {p for p, _ in train_set.samples} & {p for p, _ in test_set.samples}
    assert test_set.samples == again.samples and test_set.classes == ["Forest", "River"]
    images, _ = next(iter(EvalDataModule("eurosat", ImageSpec(32), root=str(tmp_path), decode_size=64).eval_batches("test", CPU)))
    assert images.shape == (4, 3, 32, 32)
