"""The research protocol: fixed test splits, independent random streams, exact resume, a logit-scale
clamp that lets the scale come back down, no model selection on the test split, and each dataset's own
zero-shot prompts."""

from __future__ import annotations

import math

import lightning as L
import pandas as pd
import pytest
import torch
from conftest import compose_config

from clipbench.config import ConfigError, validate
from clipbench.data.datamodule import CLIPDataModule
from clipbench.data.device_batches import Augment, DeviceBatches, EpochOrder
from clipbench.data.templates import dataset_class_names, dataset_prompts, resolve_templates
from clipbench.embeddings import EvalDataModule
from clipbench.losses import clip_loss
from clipbench.models.backbone import MAX_LOGIT_SCALE, ImageSpec
from clipbench.runs import optimized_metric
from clipbench.training import train

TINY = [
    "model.backbone.embed_dim=32",
    "model.backbone.text_width=32",
    "model.backbone.text_layers=1",
    "model.backbone.image_tower.widths=[16,32,32]",
    "logger=none",
    "trainer.enable_progress_bar=false",
    "~callbacks.prediction_grid",
]


# ------------------------------------------------------------------------------------ splits
def test_test_split_is_fixed_while_the_validation_hold_out_follows_the_seed():
    splits = {}
    for seed in (0, 1):
        datamodule = CLIPDataModule("digits", ImageSpec(8), seed=seed, val_fraction=0.1)
        datamodule.setup()
        splits[seed] = datamodule.splits
    assert torch.equal(splits[0]["test"].images, splits[1]["test"].images)
    assert not torch.equal(splits[0]["val"].images, splits[1]["val"].images)
    # Evaluation's view of a split does not depend on the seed either, so neither does its cache key.
    assert EvalDataModule("digits", ImageSpec(8), seed=0).identity("test") == EvalDataModule("digits", ImageSpec(8), seed=5).identity(
        "test"
    )


# ------------------------------------------------------------------------------- random streams
def _epoch_batches(seed: int, epoch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    images = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    batches = DeviceBatches(images, torch.arange(64), 16, ImageSpec(8), Augment(crop_padding=2), shuffle=True, seed=seed)
    batches.sampler.set_epoch(epoch)
    return list(batches)


def test_order_and_augmentation_streams_are_independent_across_seeds_and_epochs():
    # seed + epoch seeding made (seed 0, epoch 1) replay (seed 1, epoch 0); seed*1000 + epoch*100 + rank
    # made the augmentation of (seed 0, epoch 10) replay (seed 1, epoch 0).
    for a, b in [((0, 1), (1, 0)), ((0, 10), (1, 0)), ((0, 0), (0, 1))]:
        first, second = _epoch_batches(*a), _epoch_batches(*b)
        assert not any(torch.equal(x[1], y[1]) for x, y in zip(first, second, strict=True)), (a, b)  # orders
        assert not any(torch.equal(x[0], y[0]) for x, y in zip(first, second, strict=True)), (a, b)
    # The same (seed, epoch) is the same stream, whatever was drawn before.
    for x, y in zip(_epoch_batches(3, 2), _epoch_batches(3, 2), strict=True):
        assert torch.equal(x[0], y[0]) and torch.equal(x[1], y[1])
    assert not torch.equal(EpochOrder(64, True, 3).indices(torch.device("cpu")), torch.arange(64))


def test_crop_offsets_stay_within_the_padding_and_differ_per_sample():
    pad, size = 3, 8
    x = torch.arange(size * size, dtype=torch.float32).view(1, 1, size, size).repeat(32, 3, 1, 1)
    out = Augment(crop_padding=pad, hflip=False)(x, torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(x[:1], (pad,) * 4, mode="reflect")[0, 0]
    offsets = []
    for sample in out[:, 0]:
        found = [
            (dy, dx)
            for dy in range(2 * pad + 1)
            for dx in range(2 * pad + 1)
            if torch.equal(padded[dy : dy + size, dx : dx + size], sample)
        ]
        assert found, "a crop is not a window of the padded image within the padding"
        offsets.append(found[0])
    assert len(set(offsets)) > 8  # 32 samples, 49 possible offsets: drawn per sample, not once per batch


# -------------------------------------------------------------------------------------- resume
class StopAfterEpochs(L.Callback):
    """Ends fitting after ``epochs`` epochs, as a killed run would after its last saved epoch."""

    def __init__(self, epochs: int) -> None:
        self.epochs = epochs

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.current_epoch + 1 >= self.epochs:
            trainer.should_stop = True


def test_resuming_after_two_epochs_gives_the_four_epoch_run(tmp_path, cache_dir):
    # test_ckpt=last: Lightning does not carry the best score over into a resumed run's new directory,
    # so "best" may name different epochs in the two runs; the last weights must be the same.
    base = [
        "experiment=quickstart",
        "data=synthetic",
        "data.synthetic_samples=256",
        "data.batch_size=64",
        "trainer.max_epochs=4",
        "test_ckpt=last",
        *TINY,
    ]
    straight = train(compose_config("train", base, tmp_path / "straight", cache_dir))
    stop = ["+callbacks.stop._target_=test_protocol.StopAfterEpochs", "+callbacks.stop.epochs=2"]
    train(compose_config("train", [*base, *stop], tmp_path / "killed", cache_dir))
    ckpt = tmp_path / "killed" / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, weights_only=True)["epoch"] == 1  # two epochs done (0 and 1)
    resumed = train(compose_config("train", [*base, f"ckpt_path={ckpt}"], tmp_path / "resumed", cache_dir))

    assert resumed["steps"] == straight["steps"]
    assert list(pd.read_csv(tmp_path / "resumed" / "epochs.csv")["epoch"]) == [2, 3]  # only the remaining epochs ran
    for key in ("val/acc1", "val/acc5", "test/acc1", "test/acc5", "test/mean_recall"):
        assert resumed[key] == pytest.approx(straight[key], abs=1e-6), key
    weights = [torch.load(tmp_path / run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"] for run in ("straight", "resumed")]
    for name, value in weights[0].items():
        torch.testing.assert_close(weights[1][name], value, rtol=1e-5, atol=1e-6, msg=name)


# --------------------------------------------------------------------------------- logit scale
def test_logit_scale_is_clamped_after_the_step_and_can_come_back_down(tmp_path, cache_dir):
    from clipbench.training import build_module

    cfg = compose_config("train", ["experiment=quickstart", *TINY], tmp_path, cache_dir)
    backbone = build_module(cfg.model).backbone
    image, text = torch.nn.functional.normalize(torch.randn(2, 8, 32), dim=-1)  # unrelated: a lower scale helps
    with torch.no_grad():
        backbone.logit_scale.fill_(math.log(150.0))
    (grad,) = torch.autograd.grad(clip_loss(image, text, backbone.similarity_scale()), backbone.logit_scale)
    assert grad > 0  # a clamp in the forward (exp().clamp(max=100)) would give zero gradient up here

    backbone.clamp_logit_scale_()
    assert backbone.similarity_scale().item() == pytest.approx(MAX_LOGIT_SCALE)
    optimizer = torch.optim.SGD([backbone.logit_scale], lr=0.5)
    for _ in range(3):
        optimizer.zero_grad()
        clip_loss(image, text, backbone.similarity_scale()).backward()
        optimizer.step()
        backbone.clamp_logit_scale_()
    assert backbone.similarity_scale().item() < 0.9 * MAX_LOGIT_SCALE


def test_training_clamps_a_scale_above_the_cap(tmp_path, cache_dir):
    cfg = compose_config(
        "train",
        ["experiment=quickstart", "data=synthetic", "trainer.max_epochs=1", "+trainer.limit_train_batches=1", *TINY],
        tmp_path,
        cache_dir,
    )
    from clipbench.training import build_module

    module = build_module(cfg.model)
    with torch.no_grad():
        module.backbone.logit_scale.fill_(math.log(400.0))
    datamodule = CLIPDataModule("synthetic", module.backbone.image_spec, batch_size=64, val_fraction=0.0)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=1, limit_val_batches=0, logger=False, enable_checkpointing=False, enable_progress_bar=False
    )
    trainer.fit(module, datamodule=datamodule)
    assert module.backbone.similarity_scale().item() == pytest.approx(MAX_LOGIT_SCALE, rel=1e-5)


# ------------------------------------------------------------------------- model selection
def test_choosing_the_tested_checkpoint_on_the_test_split_is_refused(tmp_path, cache_dir):
    cfg = compose_config("train", ["experiment=quickstart", "data.val_fraction=0", "test_ckpt=best"], tmp_path, cache_dir)
    with pytest.raises(ConfigError, match=r"test_ckpt=best with data\.val_fraction=0"):
        validate(cfg)
    validate(compose_config("train", ["experiment=quickstart", "data.val_fraction=0", "test_ckpt=last"], tmp_path, cache_dir))


def test_sweepers_get_the_validation_metric_not_the_test_accuracy(tmp_path, cache_dir):
    cfg = compose_config("train", ["experiment=quickstart"], tmp_path, cache_dir)
    assert cfg.optimized_metric == "val/acc1"
    metrics = {"val/acc1": 0.25, "test/acc1": 0.75}
    assert optimized_metric(cfg, metrics) == 0.25
    cfg.optimized_metric = "val/acc1_best"
    assert optimized_metric(cfg, metrics) is None  # a single run only warns that the key is missing


# --------------------------------------------------------------------------------- zero-shot prompts
def test_each_dataset_gets_its_own_readable_class_names_and_templates():
    assert dataset_class_names("caltech101", ["Faces_easy", "car_side", "yin_yang"]) == [
        "centered face",
        "side of a car",
        "yin and yang symbol",
    ]
    # Matched by raw name, so a copy whose classes come in another order gets the right names.
    assert dataset_class_names("eurosat", ["SeaLake", "AnnualCrop"]) == ["lake or sea", "annual crop land"]
    assert dataset_class_names("cifar100", ["aquarium_fish"]) == ["aquarium fish"]
    assert dataset_class_names("imagefolder", ["my_class"]) == ["my class"]
    assert resolve_templates("dataset", dataset="food101") == ("a photo of {}, a type of food.",)
    assert len(resolve_templates("dataset", dataset="cifar10")) == 18
    assert resolve_templates("dataset", dataset="imagefolder") == tuple(dataset_prompts("imagenet")["templates"])
    assert len(resolve_templates("dataset", dataset="imagefolder")) == 80
    assert resolve_templates(["a {c} texture."]) == ("a {} texture.",)  # CLIP_benchmark's placeholder


def test_zero_shot_defaults_to_the_dataset_protocol(tmp_path):
    cfg = compose_config("evaluate", ["data=cifar10"], tmp_path, tmp_path)
    assert cfg.task.templates == "dataset"
    assert resolve_templates(cfg.task.templates, dataset=cfg.data.name)[1] == "a blurry photo of a {}."
