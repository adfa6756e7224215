"""Shuffles made on the fly for training (``data.cs``), cached on disk by what they depend on.

A sweep over ``data.cs`` re-runs the same shuffle for every job that shares (captions, Cs, mode,
seed, top-k), and DDP ranks all need it at once: the first process to take the lock computes it and
writes it atomically (temporary file, then rename); the others wait and read it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from filelock import FileLock

from clipbench.misalign.shuffle import shuffle_captions

log = logging.getLogger(__name__)


def captions_key(captions: Sequence[Any]) -> str:
    """SHA-1 of the captions in order (a missing caption hashes differently from an empty one)."""
    digest = hashlib.sha1()
    for caption in captions:
        digest.update(b"\x01" + caption.encode("utf-8", "surrogatepass") if isinstance(caption, str) else b"\x00")
    return digest.hexdigest()


def cached_sources(captions: Sequence[Any], cs: float, mode: str, seed: int, top_k: int, cache_dir: str | Path | None) -> np.ndarray:
    """``source`` of :func:`clipbench.misalign.shuffle.shuffle_captions` (row i takes the caption of
    row source[i]), from ``<cache_dir>/misalign/`` when it was computed before."""
    if cache_dir is None:
        return shuffle_captions(captions, cs, mode, seed, top_k)[0].source
    identity = {"captions": captions_key(captions), "rows": len(captions), "cs": cs, "mode": mode, "seed": seed, "top_k": top_k}
    key = hashlib.sha1(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    path = Path(cache_dir) / "misalign" / f"{mode}_cs{cs:g}_seed{seed}_{key}.npy"
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{path}.lock"):
        if path.exists():
            log.info("misaligned captions (Cs=%g, %s) read from %s", cs, mode, path)
            return np.load(path)
        shuffle = shuffle_captions(captions, cs, mode, seed, top_k)[0]
        partial = path.with_suffix(f".{os.getpid()}.tmp.npy")
        np.save(partial, shuffle.source)
        partial.replace(path)
        log.info(
            "misaligned captions (Cs=%g, %s): %.4f of %d rows misaligned; cached at %s", cs, mode, shuffle.achieved, len(captions), path
        )
    return shuffle.source
