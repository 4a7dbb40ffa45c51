"""`imgcls-dist ingest SRC OUT`: an ImageFolder tree or `builtin:NAME` -> Parquet shards + dataset.json."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
from sklearn.model_selection import train_test_split

from imgcls_dist.data.builtin import builtin_rows
from imgcls_dist.data.decode import decode_image
from imgcls_dist.data.schema import DATASET_FILE, SPLITS
from imgcls_dist.data.shards import write_shards
from imgcls_dist.errors import UserError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def _image_folder_rows(src: Path) -> tuple[list[tuple[str, bytes, int]], list[str], list[str]]:
    classes = sorted(d.name for d in src.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise UserError(f"{src}: no class subdirectories (expected SRC/<class>/<image>)")
    rows, skipped = [], []
    for ci, c in enumerate(classes):
        for f in sorted((src / c).rglob("*")):
            if not f.is_file() or f.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            data = f.read_bytes()
            # Decode once at ingest so a training set never carries rows that can't be used.
            res = decode_image(data)
            if res.error:
                skipped.append(f"{f}: {res.error}")
                continue
            rows.append((str(f.relative_to(src)), data, ci))
    if not rows:
        raise UserError(f"{src}: no decodable images found under the class directories")
    return rows, classes, skipped


def _split_indices(labels: np.ndarray, fractions: tuple[float, float, float], seed: int) -> dict[str, np.ndarray]:
    idx = np.arange(len(labels))
    train_f, val_f, test_f = fractions
    counts = Counter(labels.tolist())
    # Stratify only when every class can appear in every split; tiny folders fall back to random.
    strat = labels if min(counts.values()) >= 3 else None
    rest_f = val_f + test_f
    if rest_f == 0:
        return {"train": idx, "val": idx[:0], "test": idx[:0]}
    train_idx, rest = train_test_split(idx, test_size=rest_f, random_state=seed, stratify=strat)
    if val_f == 0 or test_f == 0:
        return {"train": train_idx, "val": rest if val_f else rest[:0], "test": rest if test_f else rest[:0]}
    val_idx, test_idx = train_test_split(
        rest, test_size=test_f / rest_f, random_state=seed, stratify=None if strat is None else labels[rest]
    )
    return {"train": train_idx, "val": val_idx, "test": test_idx}


def ingest(
    src: str,
    out: str | Path,
    *,
    image_size: int = 32,
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
    rows_per_shard: int = 500,
    seed: int = 0,
    overwrite: bool = False,
) -> dict:
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6 or fractions[0] <= 0:
        raise UserError(f"--splits {fractions}: need three non-negative fractions train,val,test summing to 1 (train > 0)")
    if rows_per_shard < 1:
        raise UserError("--rows-per-shard must be >= 1")
    out = Path(out)
    if (out / DATASET_FILE).exists():
        if not overwrite:
            raise UserError(f"{out}: already holds a dataset (use --overwrite to replace it)")
        for s in SPLITS:
            shutil.rmtree(out / s, ignore_errors=True)
    skipped: list[str] = []
    extra: dict = {}
    if src.startswith("builtin:"):
        rows_iter, _, classes, extra = builtin_rows(src.split(":", 1)[1], image_size)
        rows = list(rows_iter)
        source = src
    else:
        p = Path(src)
        if not p.is_dir():
            raise UserError(f"{src}: not a directory (expected an ImageFolder tree SRC/<class>/<image> or builtin:digits)")
        rows, classes, skipped = _image_folder_rows(p)
        source = str(p.resolve())
    labels = np.array([r[2] for r in rows], dtype=np.int64)
    parts = _split_indices(labels, fractions, seed)
    counts = {}
    for split in SPLITS:
        chosen = sorted(parts[split].tolist())
        write_shards((rows[i] for i in chosen), out / split, rows_per_shard=rows_per_shard)
        counts[split] = len(chosen)
    meta = {
        "classes": classes,
        "counts": counts,
        "source": source,
        "class_counts": {s: {classes[k]: v for k, v in sorted(Counter(labels[parts[s]].tolist()).items())} for s in SPLITS},
        "seed": seed,
        "skipped": skipped,
        **{k: v for k, v in extra.items() if k != "source"},
    }
    (out / DATASET_FILE).write_text(json.dumps(meta, indent=2))
    return meta
