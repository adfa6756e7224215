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
from clipbench.purity import METRICS, purity_metrics
from clipbench.seeding import CAPTIONS, stream_seed
from clipbench.zeroshot import class_embeddings, zeroshot_logits


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
        train_templates: Any = "train",
        eval_templates: Any = "train",
        trainable: str = "all",
        compile: bool = False,
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

    # --------------------------------------------------------------- training
    def on_train_epoch_start(self) -> None:
        # Which template captions each sample is drawn from a stream keyed by (seed, epoch, rank), so a
        # run resumed from an epoch's checkpoint draws what the uninterrupted run drew.
        seed = getattr(self.trainer.datamodule, "seed", 0)
        self._template_rng = torch.Generator(device=self.device)
        self._template_rng.manual_seed(stream_seed(seed, self.current_epoch, CAPTIONS, self.global_rank))

    def _loss(self, images: Tensor, labels: Tensor, template: Tensor) -> Tensor:
        text = self._caption_features(template * len(self.class_names) + labels)
        image, text = self._global_batch(self.backbone.encode_image(images), text)
        if self.trainer.world_size > 1:
            labels = self.all_gather(labels).flatten()
        return clip_loss(image, text, self.backbone.similarity_scale(), labels if self.hparams.same_class_positives else None)

    def _pairs_loss(self, images: Tensor, tokens: Tensor) -> Tensor:
        """CLIP's loss on image-caption pairs: each image's own caption is its one positive."""
        image, text = self._global_batch(self.backbone.encode_image(images), self.backbone.encode_text(tokens))
        return clip_loss(image, text, self.backbone.similarity_scale())

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

        Captions repeat heavily within a batch. When there are no more possible captions than
        samples, encode them all: a fixed shape (no recompiles under ``compile``) and no host sync.
        Otherwise encode each distinct caption of the batch once.
        """
        if len(self.caption_tokens) <= len(caption_ids):
            return self.backbone.encode_text(self.caption_tokens)[caption_ids]
        unique_ids, inverse = torch.unique(caption_ids, return_inverse=True)
        return self.backbone.encode_text(self.caption_tokens[unique_ids])[inverse]

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, targets = batch
        if targets.ndim == 2:  # (B, L) caption tokens: image-caption pairs
            loss = self._pairs_step_fn(images, targets)
        else:  # (B,) class labels, captioned by templates
            template = torch.randint(len(self.train_templates), targets.shape, device=targets.device, generator=self._template_rng)
            loss = self._step_fn(images, targets, template)
        # Not on the progress bar per step: showing it would sync the device every step. The learning
        # rate is logged by Lightning's LearningRateMonitor (conf/callbacks/default.yaml).
        self.log("train/loss", loss, on_step=True, on_epoch=True, batch_size=len(targets))
        self.log("train/temperature", 1.0 / self.backbone.similarity_scale(), on_step=False, on_epoch=True)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if self.hparams.trainable != "projections":  # a frozen scale stays exactly as the source had it
            self.backbone.clamp_logit_scale_()  # after the optimizer step
        if batch_idx == self.trainer.num_training_batches - 1:
            self._log_purity()

    def _log_purity(self) -> None:
        """Feature purity of both projections after the epoch's last step (``purity/<tower>/<metric>``,
        :func:`clipbench.purity.purity_metrics`). Logged from the last batch rather than at epoch end,
        so that the epoch's history row (written by a callback before the module's epoch-end hook) holds it."""
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

    def _zeroshot_step(self, batch: tuple[Tensor, Tensor], metrics: MetricCollection) -> Tensor:
        images, labels = batch
        logits = zeroshot_logits(self.backbone.encode_image(images), self.classifier)
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
        optimizer = torch.optim.AdamW(groups, lr=self.hparams.lr, betas=tuple(self.hparams.betas), eps=self.hparams.eps)
        total = int(self.trainer.estimated_stepping_batches)
        if self.hparams.warmup_epochs is not None:  # whole epochs, as the misalignment recipe states it
            warmup = max(1, round(self.hparams.warmup_epochs * total / max(1, self.trainer.max_epochs)))
        else:
            warmup = max(1, int(self.hparams.warmup_fraction * total))
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine(step, warmup, total, self.hparams.min_lr_ratio))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
