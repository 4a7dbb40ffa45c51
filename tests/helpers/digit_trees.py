"""Test helper (no tests here): small image trees of digit PNGs, laid out as `ingest` reads them."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from imgcls_dist.data.builtin import digits_images


def image_tree(root: Path, per_class: int, splits: dict[str, str] | None = None, size: int = 12,
               classes=("0", "1", "2")) -> int:
    """Digit PNGs in root/<class>/ (or root/<split folder>/<class>/ with `splits`: folder -> share of
    the images). Returns the number of files written."""
    images, labels, _ = digits_images(size)
    n = 0
    for c in classes:
        picks = [img for img, lbl in zip(images, labels) if str(lbl) == c][:per_class]
        folders = list(splits.items()) if splits else [("", 1.0)]
        start = 0
        for k, (folder, share) in enumerate(folders):
            stop = len(picks) if k == len(folders) - 1 else start + int(round(share * len(picks)))
            d = root / folder / c if folder else root / c
            d.mkdir(parents=True, exist_ok=True)
            for i, img in enumerate(picks[start:stop]):
                Image.fromarray(img).save(d / f"{c}_{start + i:04d}.png")
                n += 1
            start = stop
    return n
