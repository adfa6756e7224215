"""Independent random streams derived from the run's seed.

Seeding each epoch with ``seed + epoch`` makes run (seed s, epoch e) replay run (s + 1, e - 1), and
``seed * 1000 + epoch * 100 + rank`` collides from epoch 10 on. numpy's ``SeedSequence`` hashes the
run's seed together with a key (epoch, purpose, rank), so every stream is distinct and independent.
"""

from __future__ import annotations

import numpy as np

# The purposes a stream is drawn for, so that two purposes never share a stream.
ORDER, AUGMENT, CAPTIONS, INIT_SAMPLE = 0, 1, 2, 3  # INIT_SAMPLE: images for data-dependent initialisation


def stream_seed(seed: int, *key: int) -> int:
    """A 63-bit seed (fits ``torch.Generator.manual_seed``) for the stream ``key`` of run ``seed``."""
    state = np.random.SeedSequence(entropy=seed, spawn_key=tuple(key)).generate_state(1, np.uint64)[0]
    return int(state >> np.uint64(1))
