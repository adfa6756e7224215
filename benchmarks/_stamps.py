"""The training-step clock shared by the step-rate benchmarks (a Lightning callback, so kept out of
``_common``, which every benchmark imports before it knows whether it trains)."""

from __future__ import annotations

import time

import _common as C
import lightning as L


class StepStamps(L.Callback):
    """A timestamp at the start of every training step and one when training ends, and the module's
    parameter count once it is set up (a compact vocabulary is built by then). The latest instance is
    ``StepStamps.latest``, for runs that build their callbacks from a config (``train()``)."""

    latest: StepStamps | None = None

    def __init__(self, device: str) -> None:
        self.device, self.stamps, self.parameters = device, [], 0
        StepStamps.latest = self

    def on_train_start(self, trainer, pl_module) -> None:
        self.parameters = sum(p.numel() for p in pl_module.parameters())

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.stamps.append(time.perf_counter())

    def on_train_end(self, trainer, pl_module) -> None:
        C.sync(self.device)
        self.stamps.append(time.perf_counter())
