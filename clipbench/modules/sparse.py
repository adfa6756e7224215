"""Sparse evaluation as a LightningModule: each image embedding replaced by a sparse, non-negative
combination of concepts (SpLiCE), decomposed batch by batch on the trainer's devices."""

from __future__ import annotations

import time
from dataclasses import dataclass

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor

from clipbench.sparse.decomposition import centre, recompose
from clipbench.sparse.solver import dictionary_gram, lasso


@dataclass(frozen=True)
class SolverOptions:
    """The solver's keys of ``conf/task/sparse.yaml`` (see :func:`clipbench.sparse.solver.lasso`)."""

    lam: float
    nonneg: bool = True
    tol: float = 1e-5
    max_iter: int = 2000
    max_rounds: int = 20
    working_set: int = 32

    def solve(self, embeddings: Tensor, dictionary: Tensor, gram: Tensor | str | None = "auto"):
        return lasso(
            embeddings,
            dictionary,
            self.lam,
            nonneg=self.nonneg,
            tol=self.tol,
            max_iter=self.max_iter,
            max_rounds=self.max_rounds,
            working_set=self.working_set,
            chunk_size=max(1, len(embeddings)),  # the caller's batch (task.batch_size) bounds the memory
            gram=gram,
        )


class SparseEvaluation(L.LightningModule):
    """``predict_step`` over batches of image embeddings (features, labels, index): per image its
    sparse code, the cosine between its dense embedding and the reconstruction, the relative error of
    the decomposition, and zero-shot logits of the reconstruction against ``classifier`` (C, d): the
    class text embeddings, or their own reconstructions to classify sparse-to-sparse.

    ``dictionary`` (K, d) is already normalised (and centred); ``image_mean`` (d,) centres the images
    and is added back to the reconstructions (None: no centring).
    """

    def __init__(self, dictionary: Tensor, classifier: Tensor, image_mean: Tensor | None, solver: SolverOptions) -> None:
        super().__init__()
        self.solver = solver
        self.register_buffer("dictionary", dictionary.float())
        self.register_buffer("classifier", classifier.float())
        self.register_buffer("image_mean", None if image_mean is None else image_mean.float())
        self.gram: Tensor | None = None

    def on_predict_start(self) -> None:
        # The dictionary's Gram matrix serves every batch: computed once, on this rank's device.
        self.gram = dictionary_gram(self.dictionary)

    def predict_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> dict:
        features, labels, index = batch
        # The solver works in float32 whatever the trainer's precision: its tolerance is a float32 one.
        with torch.autocast(self.device.type, enabled=False):
            dense = F.normalize(features.float(), dim=-1)
            z = centre(dense, self.image_mean)
            started = time.perf_counter()
            codes = self.solver.solve(z, self.dictionary, self.gram)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            seconds = time.perf_counter() - started
            rebuilt = recompose(codes, self.dictionary, self.image_mean)
            error = (z - codes.reconstruct(self.dictionary)).norm(dim=-1) / z.norm(dim=-1)
            return {
                "codes": codes,
                "labels": labels,
                "index": index,
                "cosine": (rebuilt * dense).sum(dim=-1),
                "relative_error": error,
                "logits": rebuilt @ self.classifier.T,
                "seconds": torch.full((len(labels),), seconds / max(1, len(labels)), dtype=torch.float64),
            }
