"""Arbitrarily many labeled shard rows without downloads: the built-in digits under random augmentation,
and large photo-like JPEGs made from them.

For benchmarks and scale tests (100k rows take ~1 min to write on one core, ~1 KB per row).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

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


def photo_image(digit: np.ndarray, width: int, height: int, seed: int = 0, noise: float = 3.0) -> Image.Image:
    """A photo-like RGB image of width x height: `digit` (a small uint8 image, e.g. from `digits_images`)
    upscaled to fill the frame, under a smooth colour cast that varies across the frame, plus per-pixel
    sensor noise (std `noise`). The digit is what a classifier keys on; the noise is the fine detail a
    camera adds and a reduced-size decode averages away, and it sets the JPEG's size (the sizes at 12 MP and
    each noise level: docs/benchmarks.md, "Reduced-size JPEG decode"), which sets how much entropy
    decoding, the part of a JPEG decode no DCT scale reduces, costs."""
    rng = np.random.default_rng(seed)
    base = np.asarray(Image.fromarray(digit.squeeze()).convert("RGB").resize((width, height), Image.BICUBIC))
    cast_small = rng.uniform(0.7, 1.0, (3, 4, 3)).astype(np.float32)  # a 4x3 grid of RGB gains
    cast = np.asarray(Image.fromarray((cast_small * 255).astype(np.uint8)).resize((width, height), Image.BILINEAR))
    pixels = base * (cast * np.float32(1 / 255))
    # Uniform noise of std `noise` (half-width noise * sqrt(3)): several times cheaper to draw than normal noise.
    pixels += (rng.random((height, width, 3), dtype=np.float32) - np.float32(0.5)) * np.float32(noise * 12**0.5)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def photo_jpeg(digit: np.ndarray, width: int, height: int, seed: int = 0, noise: float = 3.0, quality: int = 90,
               **params) -> bytes:
    """`photo_image` encoded as JPEG; `params` go to PIL's JPEG writer (progressive=True, exif=...)."""
    buf = io.BytesIO()
    photo_image(digit, width, height, seed, noise).save(buf, "JPEG", quality=quality, **params)
    return buf.getvalue()
