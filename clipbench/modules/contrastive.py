"""Contrastive CLIP training on a labelled image dataset or on image-caption pairs, with zero-shot
validation and test, and the feature purity of both projections logged every epoch."""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassRecall

from clipbench.data.templates import captions, resolve_templates
from clipbench.losses import clip_loss
from clipbench.models.backbone import CLIPBackbone
from clipbench.models.checkpoint import instantiate_backbone
from clipbench.models.towers import CifarResNet
from clipbench.purity import METRICS, purity_metrics
from clipbench.seeding import CAPTIONS, stream_seed
from clipbench.zeroshot import class_embeddings, zeroshot_logits

# On an accelerator, every possible caption is encoded each step up to this many (see _caption_features).
ACCELERATOR_ALL_CAPTIONS = 512
# Training images whose 2x2 patches whiten the stem of a CifarResNet built with whiten=true (airbench's 5,000).
WHITENING_SAMPLES = 5000


def _no_decay(name: str, param: torch.nn.Parameter) -> bool:
    """Gains, biases, embeddings' scalars and the temperature are not weight-decayed (as in CLIP)."""
    return param.ndim < 2 or "logit_scale" in name or "bn" in name or "ln" in name or name.endswith(".bias")


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> float:
    """Learning-rate multiplier: linear warmup to 1, then cosine decay to ``min_ratio``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class CLIPTrainingModule(L.LightningModule):
    """Trains a :class:`CLIPBackbone` (any source) with symmetric InfoNCE.

    Batches are ``(images, labels)`` from a labelled dataset, whose captions are made from the labels
    with templates, or ``(images, tokens)`` from image-caption pairs (:mod:`clipbench.data.pairs`),
    each image's own caption its only positive (CLIP's loss). Zero-shot validation and test run when
    the datamodule has ``class_names`` (a labelled dataset, or pairs with ``eval_data``).

    ``trainable="projections"`` trains only the image and text projections: every other parameter,
    the logit scale included, is frozen, and the backbone stays in eval mode (BatchNorm statistics and
    Dropout of the frozen towers do not change).

    The backbone is given as its config (a ``_target_`` node), so a checkpoint carries what is
    needed to rebuild it: ``CLIPTrainingModule.load_from_checkpoint(path)``.
    """

    def __init__(
        self,
        backbone: dict,
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.98),
        eps: float = 1e-6,
        warmup_fraction: float = 0.05,
        warmup_epochs: float | None = None,
        min_lr_ratio: float = 0.0,
        same_class_positives: bool = True,
        label_smoothing: float = 0.0,
        train_templates: Any = "train",
        eval_templates: Any = "train",
        trainable: str = "all",
        eval_flip: bool = False,
        channels_last: bool = False,
        compile: bool = False,
        fused: bool = True,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()  # plain containers: the backbone config rebuilds the model
        self.backbone: CLIPBackbone = instantiate_backbone(backbone)  # allow-listed: it may come from a checkpoint
        self.train_templates = resolve_templates(train_templates)
        self.eval_templates = resolve_templates(eval_templates)
        if trainable == "projections":
            self._freeze_all_but_projections()
        elif trainable != "all":
            raise ValueError(f"model.trainable must be 'all' or 'projections', got {trainable!r}")
        if channels_last:  # convolution weights (4-D) only; image batches follow in the steps (_in_memory_format)
            self.backbone.to(memory_format=torch.channels_last)
        self._step_fn = torch.compile(self._loss) if compile else self._loss
        self._pairs_step_fn = torch.compile(self._pairs_loss) if compile else self._pairs_loss
        self.class_names: list[str] = []
        self.classifier: Tensor | None = None

    def _freeze_all_but_projections(self) -> None:
        keep = {id(p) for p in self.backbone.projection_parameters().values()}
        for p in self.backbone.parameters():
            p.requires_grad_(id(p) in keep)
        # Lightning (>= 2.2) fits a module in the mode it was given and restores each submodule's
        # mode after validation, so eval mode set here holds through fit (a from-scratch backbone
        # is built in training mode; loaded sources come in eval mode).
        self.backbone.eval()

    def train(self, mode: bool = True) -> CLIPTrainingModule:
        """A caller that switches the module to training mode (DDP's wrapper, user code) leaves frozen
        towers in eval mode (a projection has no mode-dependent behaviour)."""
        super().train(mode)
        if self.hparams.trainable == "projections":
            self.backbone.eval()
        return self

    # ----------------------------------------------------------------- set-up
    def setup(self, stage: str) -> None:
        datamodule = self.trainer.datamodule
        datamodule.setup(stage)
        self.class_names = list(getattr(datamodule, "class_names", None) or [])  # pairs without eval_data: none
        if self.hparams.backbone.get("vocabulary") == "captions":  # clipbench.models.scratch.CAPTIONS, not resolved yet
            self._resolve_vocabulary(datamodule)
        if not self.class_names:
            return
        # Every caption training can draw, tokenised once: tokens[t * C + c] is template t, class c.
        texts = [c for per_template in captions(self.train_templates, self.class_names) for c in per_template]
        self.register_buffer("caption_tokens", self.backbone.tokenize(texts), persistent=False)
        num_classes = len(self.class_names)
        for split in ("val", "test"):
            metrics = MetricCollection(
                {
                    "acc1": MulticlassAccuracy(num_classes, top_k=1, average="micro"),
                    "acc5": MulticlassAccuracy(num_classes, top_k=min(5, num_classes), average="micro"),
                    "mean_recall": MulticlassRecall(num_classes, average="macro"),
                },
                prefix=f"{split}/",
            )
            setattr(self, f"{split}_metrics", metrics.to(self.device))

    def _resolve_vocabulary(self, datamodule) -> None:
        """A from-scratch text tower with ``vocabulary: captions`` embeds the BPE tokens of every caption
        training and zero-shot evaluation make (train, eval and the dataset's templates x class names), plus the byte
        pieces that spell any other text (:mod:`clipbench.models.vocabulary`). Runs before the optimiser
        is made; the resolved ids go into the backbone's hyper-parameters, so a checkpoint rebuilds the
        same shapes, and a run resumed with ``ckpt_path=`` resolves the same list again."""
        from clipbench.data.pairs import PairsDataModule  # its dependencies only when the vocabulary is resolved

        if not self.class_names or isinstance(getattr(datamodule, "train_data", datamodule), PairsDataModule):  # WithZeroShotEval
            raise ValueError(
                "model.backbone.vocabulary=captions builds the text vocabulary from templates x class names of a labelled "
                "dataset, but this run trains on image-caption pairs: set model.backbone.vocabulary=null (CLIP's full "
                "vocabulary) or a list of BPE ids"
            )
        # The dataset's own zero-shot prompts too (evaluate.py's default): their words then tokenise as
        # with CLIP's full vocabulary (one untrained row each) rather than spelled in byte pieces.
        protocol = resolve_templates("dataset", dataset=datamodule.name) if hasattr(datamodule, "name") else ()
        texts = []
        for templates in (self.train_templates, self.eval_templates, protocol):
            texts += [text for row in captions(templates, self.class_names) for text in row]
        self.hparams.backbone["vocabulary"] = self.backbone.resolve_vocabulary(texts)

    def on_fit_start(self) -> None:
        self._whiten_image_stems()

    def _whiten_image_stems(self) -> None:
        """Data-dependent initialisation of towers built with ``whiten=True``
        (:meth:`CifarResNet.init_whitening`), from a sample of the training images. Once in the life of
        the weights: their ``whitened`` flag comes back with a resumed run's or a fine-tuned model's
        weights (loaded before this hook runs)."""
        towers = [m for m in self.backbone.modules() if isinstance(m, CifarResNet) and m.whitening_pending]
        if not towers:
            return
        sample = getattr(self.trainer.datamodule, "train_sample", None)
        if sample is None:
            raise ValueError(
                f"model.backbone.image_tower.whiten=true needs training images from the datamodule (train_sample), which "
                f"{type(self.trainer.datamodule).__name__} does not offer: train on a labelled dataset, or set whiten=false"
            )
        images = sample(WHITENING_SAMPLES).to(self.device)
        for tower in towers:
            tower.init_whitening(images)
            for tensor in tower.stem[0].parameters():  # every rank the same weights (eigenvectors' signs)
                tensor.data.copy_(self.trainer.strategy.broadcast(tensor.data))

    def _in_memory_format(self, images: Tensor) -> Tensor:
        """A batch of images in the towers' memory format (``channels_last`` or as it comes). Done in the
        steps: the shared ``on_after_batch_transfer`` hook makes Lightning warn on every run with a datamodule."""
        return images.contiguous(memory_format=torch.channels_last) if self.hparams.channels_last else images

    # --------------------------------------------------------------- training
    def on_train_epoch_start(self) -> None:
        # Which template captions each sample is drawn from a stream keyed by (seed, epoch, rank), so a
        # run resumed from an epoch's checkpoint draws what the uninterrupted run drew.
        seed = getattr(self.trainer.datamodule, "seed", 0)
        self._template_rng = torch.Generator(device=self.device)
        self._template_rng.manual_seed(stream_seed(seed, self.current_epoch, CAPTIONS, self.global_rank))
        self._epoch_loss_sum, self._epoch_samples = torch.zeros((), device=self.device), 0

    def _loss(self, images: Tensor, labels: Tensor, template: Tensor) -> Tensor:
        text = self._caption_features(template * len(self.class_names) + labels)
        image, text = self._global_batch(self.backbone.encode_image(images), text)
        if self.trainer.world_size > 1:
            labels = self.all_gather(labels).flatten()
        positives = labels if self.hparams.same_class_positives else None
        return clip_loss(image, text, self.backbone.similarity_scale(), positives, self.hparams.label_smoothing)

    def _pairs_loss(self, images: Tensor, tokens: Tensor) -> Tensor:
        """CLIP's loss on image-caption pairs: each image's own caption is its one positive."""
        image, text = self._global_batch(self.backbone.encode_image(images), self.backbone.encode_text(tokens))
        return clip_loss(image, text, self.backbone.similarity_scale(), label_smoothing=self.hparams.label_smoothing)

    def _global_batch(self, image: Tensor, text: Tensor) -> tuple[Tensor, Tensor]:
        """L2-normalised features of the global batch. Under DDP every rank computes the loss of the
        global batch; gathering with gradients makes the DDP-averaged gradient equal the
        single-process gradient of that loss."""
        image, text = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
        if self.trainer.world_size > 1:
            image = self.all_gather(image, sync_grads=True).flatten(0, 1)
            text = self.all_gather(text, sync_grads=True).flatten(0, 1)
        return image, text

    def _caption_features(self, caption_ids: Tensor) -> Tensor:
        """Text features of the captions ``caption_ids`` index into ``caption_tokens``.

        Captions repeat heavily within a batch. Encoding every possible caption has a fixed shape (no
        recompiles under ``compile``) and no host sync; encoding only the batch's distinct captions
        (``torch.unique``) makes the host wait for the device. So all are encoded when there are no
        more of them than samples, and on an accelerator up to ``ACCELERATOR_ALL_CAPTIONS`` of them
        (a few hundred short captions cost less than stalling the queue); otherwise each distinct one once.
        """
        possible = len(self.caption_tokens)
        if possible <= len(caption_ids) or (self.device.type != "cpu" and possible <= ACCELERATOR_ALL_CAPTIONS):
            return self.backbone.encode_text(self.caption_tokens)[caption_ids]
        unique_ids, inverse = torch.unique(caption_ids, return_inverse=True)
        return self.backbone.encode_text(self.caption_tokens[unique_ids])[inverse]

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, targets = batch
        images = self._in_memory_format(images)
        if targets.ndim == 2:  # (B, L) caption tokens: image-caption pairs
            loss = self._pairs_step_fn(images, targets)
        else:  # (B,) class labels, captioned by templates
            template = torch.randint(len(self.train_templates), targets.shape, device=targets.device, generator=self._template_rng)
            loss = self._step_fn(images, targets, template)
        # The epoch's mean loss accumulates on the device; the step loss goes to Lightning only on the
        # steps its loggers write (every trainer.log_every_n_steps): each self.log call costs a
        # fraction of a millisecond of host time, a step of cifar10_fast on an H100 about ten. Never on
        # the progress bar per step: showing it would sync the device every step. The learning rate
        # is logged by Lightning's LearningRateMonitor (conf/callbacks/default.yaml).
        self._epoch_loss_sum += loss.detach() * len(targets)
        self._epoch_samples += len(targets)
        if (self.global_step + 1) % self.trainer.log_every_n_steps == 0:
            self.log("train/loss_step", loss, on_step=True, on_epoch=False, batch_size=len(targets))
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if self.hparams.trainable != "projections":  # a frozen scale stays exactly as the source had it
            self.backbone.clamp_logit_scale_()  # after the optimizer step
        if batch_idx == self.trainer.num_training_batches - 1:
            self._log_epoch_end_state()

    def _log_epoch_end_state(self) -> None:
        """The temperature and the feature purity of both projections after the epoch's last step
        (``train/temperature``, ``purity/<tower>/<metric>``, :func:`clipbench.purity.purity_metrics`):
        once per epoch, not per step. Logged from the last batch rather than at epoch end, so that the
        epoch's history row (written by a callback before the module's epoch-end hook) holds them.
        The epoch's mean training loss (``train/loss_epoch``) is logged here too."""
        self.log("train/loss_epoch", self._epoch_loss_sum / self._epoch_samples, on_step=False, on_epoch=True)
        self.log("train/temperature", 1.0 / self.backbone.similarity_scale(), on_step=False, on_epoch=True)
        for tower in ("image", "text"):
            metrics = purity_metrics(self.backbone.projection_matrix(tower).detach())
            self.log_dict({f"purity/{tower}/{name}": metrics[name] for name in METRICS}, on_step=False, on_epoch=True, sync_dist=False)

    # ------------------------------------------------------ zero-shot eval
    def _refresh_classifier(self) -> None:
        self.classifier = class_embeddings(self.backbone, self.class_names, self.eval_templates, self.device)

    def on_validation_epoch_start(self) -> None:
        self._refresh_classifier()

    def on_test_epoch_start(self) -> None:
        self._refresh_classifier()

    def zeroshot_image_features(self, images: Tensor) -> Tensor:
        """Image embeddings for zero-shot validation and test. With ``eval_flip`` (test-time flip
        augmentation), the renormalised mean of the normalised embeddings of each image and its mirror
        image. Averaging the views' cosine logits instead would give the same ranking of classes (the
        two differ by a positive factor per image); averaging embeddings keeps the logits cosine
        similarities of one unit embedding per image."""
        features = self.backbone.encode_image(images)
        if not self.hparams.eval_flip:
            return features
        mirrored = self.backbone.encode_image(images.flip(-1))
        return F.normalize(F.normalize(features.float(), dim=-1) + F.normalize(mirrored.float(), dim=-1), dim=-1)

    def _zeroshot_step(self, batch: tuple[Tensor, Tensor], metrics: MetricCollection) -> Tensor:
        images, labels = batch
        logits = zeroshot_logits(self.zeroshot_image_features(self._in_memory_format(images)), self.classifier)
        metrics.update(logits, labels)
        self.log_dict(metrics, on_epoch=True, prog_bar=True, batch_size=len(labels))
        return logits.argmax(dim=-1)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._zeroshot_step(batch, self.val_metrics)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._zeroshot_step(batch, self.test_metrics)

    # -------------------------------------------------------------- optimiser
    def configure_optimizers(self):
        named = [(n, p) for n, p in self.backbone.named_parameters() if p.requires_grad]
        groups = [
            {"params": [p for n, p in named if not _no_decay(n, p)], "weight_decay": self.hparams.weight_decay},
            {"params": [p for n, p in named if _no_decay(n, p)], "weight_decay": 0.0},
        ]
        # fused: one kernel for the whole update (CPU and CUDA); torch's default updates parameter by
        # parameter on the CPU, 6x slower for a 16M-parameter model on 2 cores.
        optimizer = torch.optim.AdamW(
            groups, lr=self.hparams.lr, betas=tuple(self.hparams.betas), eps=self.hparams.eps, fused=self.hparams.fused
        )
        total = int(self.trainer.estimated_stepping_batches)
        if self.hparams.warmup_epochs is not None:  # whole epochs, as the misalignment recipe states it
            warmup = max(1, round(self.hparams.warmup_epochs * total / max(1, self.trainer.max_epochs)))
        else:
            warmup = max(1, int(self.hparams.warmup_fraction * total))
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine(step, warmup, total, self.hparams.min_lr_ratio))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
