"""Built-in datasets that need no download: scikit-learn's digits (1,797 real 8x8 scans, in the wheel)."""

from __future__ import annotations

import io
from typing import Iterator

import numpy as np
from PIL import Image

from imgcls_dist.errors import UserError

BUILTINS = ("digits",)


DIGIT_CLASSES = [str(i) for i in range(10)]


def builtin_classes(name: str) -> list[str]:
    if name != "digits":
        known = ", ".join("builtin:" + b for b in BUILTINS)
        raise UserError(f"builtin:{name}: unknown built-in dataset (known: {known})")
    return DIGIT_CLASSES


def encode_png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def digits_images(size: int = 32) -> tuple[list[np.ndarray], np.ndarray, list[str]]:
    """Digits as RGB uint8 arrays upscaled to `size` (bicubic: smoother strokes than nearest at 4x)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    # Values are ink counts 0..16; invert so digits are dark on white, like a scan.
    gray = (255 - d.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    out = []
    for g in gray:
        img = Image.fromarray(g, mode="L").resize((size, size), Image.BICUBIC).convert("RGB")
        out.append(np.asarray(img))
    return out, d.target.astype(np.int64), DIGIT_CLASSES


def builtin_rows(name: str, size: int = 32) -> tuple[Iterator[tuple[str, bytes, int]], np.ndarray, list[str], dict]:
    builtin_classes(name)
    images, labels, classes = digits_images(size)
    rows = ((f"digits-{i:05d}", encode_png(img), int(lbl)) for i, (img, lbl) in enumerate(zip(images, labels)))
    # A mirrored digit is a different glyph (or none): flips must stay off for this dataset.
    extra = {"hflip": False, "vflip": False, "source": "sklearn.datasets.load_digits", "image_size": size, "gray": True}
    return rows, labels, classes, extra
