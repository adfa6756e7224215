"""The airbench-style recipe options of the from-scratch CLIP: label smoothing of the loss's targets,
test-time flip for zero-shot evaluation, the whitened stem, an EMA of the weights, channels_last."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import CIFAR10, compose_config
from hydra.utils import instantiate
from lightning.pytorch import Callback, seed_everything

from clipbench import runs
from clipbench.callbacks import EMAWeightAveraging
from clipbench.config import ConfigError, validate
from clipbench.losses import clip_loss
from clipbench.models.towers import WHITENING_EPS, CifarResNet
from clipbench.modules.contrastive import WHITENING_SAMPLES
from clipbench.training import build_datamodule, build_module
from clipbench.zeroshot import zeroshot_logits

TINY = [
    "experiment=quickstart",
    "data=synthetic",
    "model.backbone.embed_dim=16",
    "model.backbone.text_width=16",
    "model.backbone.text_heads=2",
    "model.backbone.text_layers=1",
    "model.backbone.image_tower.widths=[8,16,16]",
    "logger=none",
    "trainer.enable_progress_bar=false",
    "~callbacks.prediction_grid",
    "~callbacks.epoch_history",
    "~callbacks.lr_monitor",  # refuses a trainer without loggers
]


# ------------------------------------------------------------------ label smoothing
def _features(n=12, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g), dim=-1), F.normalize(torch.randn(n, d, generator=g), dim=-1)


def test_label_smoothing_of_clips_targets_is_cross_entropys():
    image, text = _features()
    scale, eps = torch.tensor(7.0), 0.2
    logits, own = scale * image @ text.T, torch.arange(12)
    reference = (F.cross_entropy(logits, own, label_smoothing=eps) + F.cross_entropy(logits.T, own, label_smoothing=eps)) / 2
    torch.testing.assert_close(clip_loss(image, text, scale, label_smoothing=eps), reference)
    # All labels distinct: the soft-target path smooths its one-hot probabilities the same way.
    torch.testing.assert_close(clip_loss(image, text, scale, torch.arange(12), label_smoothing=eps), reference)
    assert (clip_loss(image, text, scale) - reference).abs() > 1e-2  # smoothing changes the loss


def test_label_smoothing_of_same_class_soft_targets_by_hand():
    image, text = _features()
    scale, eps, n = torch.tensor(7.0), 0.3, 12
    labels = torch.tensor([0, 0, 1, 2, 2, 2, 3, 4, 4, 5, 5, 5])
    logits = scale * image @ text.T
    # Row i's target: (1 - eps) spread evenly over the columns of its class, eps spread over all n columns.
    targets = torch.zeros(n, n)
    for i in range(n):
        same = [j for j in range(n) if labels[j] == labels[i]]
        targets[i, same] = (1 - eps) / len(same)
    targets += eps / n
    by_hand = -((targets * logits.log_softmax(dim=1)).sum(1).mean() + (targets * logits.T.log_softmax(dim=1)).sum(1).mean()) / 2
    torch.testing.assert_close(clip_loss(image, text, scale, labels, label_smoothing=eps), by_hand)


# ------------------------------------------------------------------ modules built from the real configs
@pytest.fixture(scope="module")
def tiny_cfg(tmp_path_factory, cache_dir):
    def compose(*overrides: str):
        return compose_config("train", [*TINY, *overrides], tmp_path_factory.mktemp("cfg"), cache_dir)

    return compose


def _module(cfg):
    torch.manual_seed(0)
    return build_module(cfg.model).eval()


# ------------------------------------------------------------------ test-time flip
def test_eval_flip_averages_the_normalised_embeddings_of_both_views(tiny_cfg):
    module = _module(tiny_cfg("model.eval_flip=true"))
    images = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    classifier = F.normalize(torch.randn(10, 16, generator=torch.Generator().manual_seed(2)), dim=-1)
    with torch.no_grad():
        plain = F.normalize(module.backbone.encode_image(images), dim=-1)
        mirrored = F.normalize(module.backbone.encode_image(images.flip(-1)), dim=-1)
        logits = zeroshot_logits(module.zeroshot_image_features(images), classifier)
    torch.testing.assert_close(logits, F.normalize(plain + mirrored, dim=-1) @ classifier.T)
    assert (logits - plain @ classifier.T).abs().max() > 1e-3  # the flip view changed them
    # Same ranking as averaging the two views' cosine logits (they differ by a positive factor per image).
    assert torch.equal(logits.argsort(dim=1), ((plain + mirrored) @ classifier.T).argsort(dim=1))


def test_eval_flip_leaves_a_mirror_symmetric_image_as_it_is(tiny_cfg):
    flip, plain = _module(tiny_cfg("model.eval_flip=true")), _module(tiny_cfg())
    plain.load_state_dict(flip.state_dict())
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    symmetric = (images + images.flip(-1)) / 2
    with torch.no_grad():
        torch.testing.assert_close(flip.zeroshot_image_features(symmetric), F.normalize(plain.zeroshot_image_features(symmetric), dim=-1))


# ------------------------------------------------------------------ whitened stem
def _patch_covariance(images: torch.Tensor) -> torch.Tensor:
    """Covariance of 2x2 patches, the patches cut by slicing (independent of the unfold in towers.py),
    flattened in a convolution weight's (channel, row, column) order."""
    corners = [images[:, :, dy : dy + 31, dx : dx + 31] for dy in (0, 1) for dx in (0, 1)]  # (row, column) order
    patches = torch.stack(corners, dim=2).permute(0, 3, 4, 1, 2).reshape(-1, 12).double()  # channel-major, then row, column
    return torch.cov(patches.T)


def test_whitened_stem_outputs_have_identity_covariance_up_to_the_sign_pairing(tiny_cfg):
    cfg = tiny_cfg("model.backbone.image_tower.whiten=true")
    datamodule = build_datamodule(cfg, _module(cfg).backbone)
    sample = datamodule.train_sample(WHITENING_SAMPLES)
    assert len(sample) == len(datamodule.splits["train"])  # synthetic data holds fewer than 5,000
    tower = CifarResNet(16, (8, 16, 16), whiten=True)
    assert tower.whitening_pending
    tower.init_whitening(sample)
    assert not tower.whitening_pending
    with torch.no_grad():
        out = tower.stem[0](sample).permute(0, 2, 3, 1).reshape(-1, 24).double()  # before the GELU
    eigenvalues = torch.linalg.eigvalsh(_patch_covariance(sample)).flip(0)
    expected = torch.diag(eigenvalues / (eigenvalues + WHITENING_EPS))  # identity but for airbench's eps
    assert expected.diagonal().min() > 0.95  # random-noise images: every direction has variance
    pairing = torch.tensor([[1.0, -1.0], [-1.0, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(torch.cov(out.T), torch.kron(pairing, expected), atol=2e-3, rtol=0)
    torch.testing.assert_close(out.mean(0), torch.zeros(24, dtype=torch.float64), atol=1e-4, rtol=0)


def test_whitening_needs_one_channel_per_direction_and_sign():
    with pytest.raises(ValueError, match="stem_width = 2 x 12"):
        CifarResNet(16, stem_width=32, whiten=True)


# ------------------------------------------------------------------ channels_last
def test_channels_last_gives_the_default_formats_outputs(tiny_cfg):
    default, channels_last = _module(tiny_cfg()), _module(tiny_cfg("model.channels_last=true"))
    channels_last.load_state_dict(default.state_dict())
    assert channels_last.backbone.visual.stem[0].weight.is_contiguous(memory_format=torch.channels_last)
    images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    moved = channels_last._in_memory_format(images)
    assert moved.is_contiguous(memory_format=torch.channels_last) and not images.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.testing.assert_close(channels_last.backbone.encode_image(moved), default.backbone.encode_image(images), atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------ one short fit with everything on, then a resume
class Recorder(Callback):
    """The weights at the start of training and after every step, the weights each test ran with, and the
    first step's loss with its recomputation (same weights and batch, one caption template)."""

    def __init__(self) -> None:
        self.steps: list[dict[str, torch.Tensor]] = []
        self.tested: list[dict[str, torch.Tensor]] = []

    @staticmethod
    def _floats(module) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in module.state_dict().items() if v.is_floating_point()}

    def on_train_start(self, trainer, module) -> None:
        self.start = self._floats(module)

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if trainer.global_step == 0:
            images, labels = batch
            with torch.no_grad():
                image = F.normalize(module.backbone.encode_image(images), dim=-1)
                text = F.normalize(module._caption_features(labels), dim=-1)  # template 0 of one
                scale = module.backbone.similarity_scale()
                self.expected_loss = {eps: clip_loss(image, text, scale, labels, label_smoothing=eps) for eps in (0.0, SMOOTHING)}

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == 1:
            self.first_loss = outputs["loss"].detach()
        self.steps.append(self._floats(module))

    def on_test_start(self, trainer, module) -> None:
        self.tested.append(self._floats(module))


DECAY = 0.6  # far from 1: three steps move the average visibly away from the last weights
SMOOTHING = 0.1
RECIPE = [
    "callbacks=ema",
    f"callbacks.ema.decay={DECAY}",
    "model.backbone.image_tower.whiten=true",
    f"model.label_smoothing={SMOOTHING}",
    "model.train_templates=single",
    "model.eval_flip=true",
    "model.channels_last=true",
    "trainer.max_epochs=1",
    "+trainer.limit_train_batches=3",
    "data.batch_size=32",
]


def _fit(cfg, ckpt_path=None):
    seed_everything(0)
    module = build_module(cfg.model)
    datamodule = build_datamodule(cfg, module.backbone)
    recorder = Recorder()
    trainer = instantiate(cfg.trainer, callbacks=[*runs.instantiate_group(cfg.callbacks), recorder], logger=False)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    return module, datamodule, trainer, recorder


@pytest.fixture(scope="module")
def recipe_run(tmp_path_factory, cache_dir):
    out = tmp_path_factory.mktemp("recipe")
    cfg = compose_config("train", [*TINY, *RECIPE], out, cache_dir)
    validate(cfg)
    module, datamodule, trainer, recorder = _fit(cfg)
    trainer.test(module, datamodule=datamodule)  # test_ckpt=last: the weights in memory
    trainer.test(module, datamodule=datamodule, ckpt_path=trainer.checkpoint_callback.best_model_path)  # test_ckpt=best
    ema = next(c for c in trainer.callbacks if isinstance(c, EMAWeightAveraging))
    return {"out": out, "module": module, "datamodule": datamodule, "recorder": recorder, "ema": ema}


def test_training_loss_is_smoothed_and_sees_no_flipped_views(recipe_run):
    recorder = recipe_run["recorder"]
    assert (recorder.expected_loss[SMOOTHING] - recorder.expected_loss[0.0]).abs() > 1e-3
    torch.testing.assert_close(recorder.first_loss, recorder.expected_loss[SMOOTHING], rtol=1e-5, atol=1e-5)


def test_whitening_is_applied_when_training_starts(recipe_run):
    stem = recipe_run["recorder"].start
    fresh = CifarResNet(16, (8, 16, 16), whiten=True)
    fresh.init_whitening(recipe_run["datamodule"].train_sample(WHITENING_SAMPLES))
    torch.testing.assert_close(stem["backbone.visual.stem.0.weight"], fresh.stem[0].weight.detach())
    torch.testing.assert_close(stem["backbone.visual.stem.0.bias"], fresh.stem[0].bias.detach())
    assert bool(recipe_run["module"].backbone.visual.whitened)


def test_ema_weights_are_validated_checkpointed_and_tested(recipe_run):
    recorder, ema = recipe_run["recorder"], recipe_run["ema"]
    assert len(recorder.steps) == 3
    average = dict(recorder.steps[0])  # the first update copies, then average <- decay * average + (1 - decay) * weights
    for weights in recorder.steps[1:]:
        average = {k: DECAY * average[k] + (1 - DECAY) * weights[k] for k in average}
    raw_last = recorder.steps[-1]
    callbacks_average = {k: v for k, v in ema._average_model.module.state_dict().items() if v.is_floating_point()}
    bn_mean = "backbone.visual.groups.0.2.running_mean"  # BatchNorm statistics are averaged too (use_buffers)
    assert not torch.allclose(average[bn_mean], raw_last[bn_mean])
    for tested in recorder.tested:  # in memory after fit (test_ckpt=last), and from the best checkpoint
        assert tested.keys() == average.keys()
        for k in average:
            torch.testing.assert_close(tested[k], average[k], msg=k)
            torch.testing.assert_close(tested[k], callbacks_average[k], msg=k)
        assert any(not torch.allclose(tested[k], raw_last[k]) for k in raw_last)
    # last.ckpt (written at the epoch's end) resumes the raw weights and carries the average as its state_dict.
    last = torch.load(recipe_run["out"] / "checkpoints" / "last.ckpt", weights_only=True)
    for k in raw_last:
        torch.testing.assert_close(last["current_model_state"][k], raw_last[k], msg=k)
        torch.testing.assert_close(last["state_dict"][k], average[k], msg=k)


def test_resume_restores_the_average_and_does_not_whiten_again(recipe_run, tmp_path, cache_dir):
    """Resuming the finished run (nothing left to train): on_fit_start runs, the whitening does not,
    and the EMA callback gets its average back from the checkpoint."""
    last_path = recipe_run["out"] / "checkpoints" / "last.ckpt"
    last = torch.load(last_path, weights_only=True)
    stem = "backbone.visual.stem.0.weight"
    assert not torch.allclose(last["current_model_state"][stem], recipe_run["recorder"].start[stem])  # training moved it
    module, _, trainer, _ = _fit(compose_config("train", [*TINY, *RECIPE], tmp_path, cache_dir), ckpt_path=str(last_path))
    assert torch.equal(module.state_dict()[stem], last["current_model_state"][stem])  # not re-whitened
    ema = next(c for c in trainer.callbacks if isinstance(c, EMAWeightAveraging))
    torch.testing.assert_close(ema._average_model.module.state_dict()[stem], last["state_dict"][stem])


# ------------------------------------------------------------------ configs
def test_recipes_turn_the_options_on_and_quickstart_leaves_them_off(tmp_path, cache_dir):
    fast = compose_config("train", ["experiment=cifar10_fast", f"data.root={CIFAR10}"], tmp_path, cache_dir)
    assert fast.model.backbone.image_tower.whiten and fast.model.eval_flip and fast.model.channels_last
    assert fast.model.label_smoothing > 0 and fast.callbacks.ema._target_ == "clipbench.callbacks.EMAWeightAveraging"
    clip = compose_config("train", ["experiment=cifar10_clip", f"data.root={CIFAR10}"], tmp_path, cache_dir)
    assert clip.model.eval_flip and clip.model.channels_last and clip.model.label_smoothing > 0 and clip.callbacks.ema
    for cfg in (fast, clip):
        validate(cfg)
    quick = compose_config("train", ["experiment=quickstart"], tmp_path, cache_dir)
    assert not quick.model.backbone.image_tower.whiten and not quick.model.eval_flip and not quick.model.channels_last
    assert quick.model.label_smoothing == 0 and "ema" not in quick.callbacks


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["model.label_smoothing=1.0"], "model.label_smoothing"),
        (["callbacks=ema", "callbacks.ema.decay=1.0"], "callbacks.ema.decay"),
        (["callbacks=ema", "callbacks.model_checkpoint.save_weights_only=true"], "callbacks.model_checkpoint.save_weights_only"),
    ],
)
def test_impossible_recipe_values_fail_at_start_naming_the_key(overrides, key, tmp_path, cache_dir):
    cfg = compose_config("train", ["experiment=quickstart", *overrides], tmp_path, cache_dir)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(cfg)
