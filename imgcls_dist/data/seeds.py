"""Per-sample / per-epoch seeds, shared by augmentation and the training input order (numpy only: the
training driver and Tune trial actors import the input planner without albumentations)."""

from __future__ import annotations

import numpy as np


def derive_seed(*parts: int) -> int:
    """Independent 32-bit seed per tuple, e.g. (base, epoch, rank, worker); naive sums would collide
    (epoch 1 / rank 0 == epoch 0 / rank 1)."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1)[0])
