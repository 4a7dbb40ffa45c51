"""Arbitrarily many labeled shard rows without downloads: the built-in digits under random augmentation.

For benchmarks and scale tests (100k rows take ~1 min to write on one core, ~1 KB per row).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

from imgcls_dist.data.augment import apply, build_train_transform
from imgcls_dist.data.builtin import digits_images, encode_png
from imgcls_dist.data.shards import write_shards


def synthetic_rows(rows: int, size: int = 32, seed: int = 0) -> Iterator[tuple[str, bytes, int]]:
    images, labels, _ = digits_images(size)
    rng = np.random.default_rng(seed)
    # hflip=False: a mirrored digit is not the same digit, and labels must stay right for accuracy checks.
    tf = build_train_transform("standard", 0.5, size, hflip=False, seed=seed)
    for i in range(rows):
        j = int(rng.integers(len(images)))
        yield f"syn-{seed}-{i:08d}", encode_png(apply(tf, images[j])), int(labels[j])


def write_synthetic_shards(
    out_dir: str | Path, rows: int, size: int = 32, seed: int = 0, rows_per_shard: int = 5000
) -> list[Path]:
    """Write `rows` augmented digit rows (id, image PNG, label) as Parquet shards into out_dir."""
    return write_shards(synthetic_rows(rows, size, seed), out_dir, rows_per_shard=rows_per_shard, prefix="syn")
