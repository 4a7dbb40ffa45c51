"""Stratified, nested training subsets: `data.train_per_class: K` or `data.train_fraction: f`.

Each class's rows are ordered by a permutation seeded by (subset seed, class), and a subset takes a prefix
of every class's order: exactly K of a class that has K (all of one that has fewer, said on the console), or
round(f x its rows). For one seed, the 100-per-class subset is therefore inside the 500-per-class one, and
another seed draws others. Only the label column is read (8 bytes a row); the workers stream the picked rows
of each row group through the same exactly-once plan as the whole split (`train/stream.py`).
`data.balance: oversample` (`oversample_row_groups`) repeats rows of the rarer classes in those picks.
"""

from __future__ import annotations

import sys
from typing import Sequence

import numpy as np
import pyarrow.parquet as pq

from imgcls_dist.data.schema import LABEL, map_files
from imgcls_dist.data.seeds import derive_seed
from imgcls_dist.errors import UserError
from imgcls_dist.storage import location
from imgcls_dist.train.row_group import RowGroup
from imgcls_dist.train.stream import group_rows


def _labels_by_group(uri: str) -> list[np.ndarray]:
    f = location(uri)
    pf = pq.ParquetFile(f.path, filesystem=f.fs)
    return [pf.read_row_group(i, columns=[LABEL]).column(LABEL).to_numpy() for i in range(pf.num_row_groups)]


def per_class_counts(counts: np.ndarray, *, per_class: int | None, fraction: float | None) -> np.ndarray:
    """How many rows of each class the subset takes."""
    if per_class is not None:
        return np.minimum(counts, per_class)
    return np.rint(counts * fraction).astype(np.int64)


def select_rows(labels: np.ndarray, num_classes: int, *, seed: int, per_class: int | None = None,
                fraction: float | None = None) -> np.ndarray:
    """Row positions (sorted) of the subset of rows with these labels."""
    counts = np.bincount(labels, minlength=num_classes)
    take = per_class_counts(counts, per_class=per_class, fraction=fraction)
    picked = []
    for c in range(num_classes):
        rows = np.flatnonzero(labels == c)
        order = np.random.default_rng(derive_seed(seed, c, 0x5E)).permutation(len(rows))
        picked.append(rows[order[: take[c]]])
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, np.int64)


def subset_row_groups(files: Sequence[str], classes: Sequence[str], *, seed: int, per_class: int | None = None,
                      fraction: float | None = None) -> list[RowGroup]:
    """The row groups of `files` restricted to the subset's rows, with dense sample ids in file order."""
    key = "data.train_per_class" if per_class is not None else "data.train_fraction"
    per_file = map_files(_labels_by_group, list(files))
    groups = [(uri, i, lab) for uri, labs in zip(files, per_file) for i, lab in enumerate(labs)]
    labels = np.concatenate([lab for _, _, lab in groups]) if groups else np.zeros(0, np.int64)
    counts = np.bincount(labels, minlength=len(classes))
    if per_class is not None and per_class > counts.max(initial=0):
        raise UserError(f"{key}: {per_class} per class is more than any class has (largest: {counts.max(initial=0)} "
                        "training rows)")
    short = [f"{classes[c]} ({counts[c]})" for c in range(len(classes))
             if per_class is not None and counts[c] < per_class]
    if short:
        print(f"train: note: {key}={per_class}: {len(short)} class(es) have fewer training rows and are taken "
              f"whole: {', '.join(short[:10])}{' ...' if len(short) > 10 else ''}", file=sys.stderr)
    keep = np.zeros(len(labels), bool)
    keep[select_rows(labels, len(classes), seed=seed, per_class=per_class, fraction=fraction)] = True
    out, start, first = [], 0, 0
    for uri, index, lab in groups:
        picks = np.flatnonzero(keep[start:start + len(lab)])
        start += len(lab)
        if len(picks):
            out.append(RowGroup(uri, index, len(picks), first, picks.astype(np.int32).tobytes()))
            first += len(picks)
    return out


def _group_labels(group: RowGroup) -> np.ndarray:
    f = location(group.file)
    t = pq.ParquetFile(f.path, filesystem=f.fs).read_row_group(group.index, columns=[LABEL])
    return group_rows(t, group).column(LABEL).to_numpy()


def balanced_class_weights(groups: Sequence[RowGroup], num_classes: int) -> list[float]:
    """sklearn's "balanced" class weights (rows / (classes x rows of the class)) over exactly the rows the run
    trains on; a class with no training rows gets 0 (it has no loss to weigh; sklearn refuses such a class).
    Only the label column is read."""
    from sklearn.utils.class_weight import compute_class_weight

    labels = np.concatenate(map_files(_group_labels, list(groups)) or [np.zeros(0, np.int64)])
    present = np.unique(labels)
    weights = np.zeros(num_classes)
    if len(present):
        weights[present] = compute_class_weight("balanced", classes=present, y=labels)
    return weights.tolist()


def copies_per_row(labels: np.ndarray, num_classes: int, seed: int) -> np.ndarray:
    """How many times each row (in sample-id order) is trained an epoch so that every class present has as many
    samples as the largest, N: each of a class's n rows N // n times, and N % n of them, drawn by a permutation
    seeded by (seed, class), once more."""
    counts = np.bincount(labels, minlength=num_classes)
    largest = counts.max(initial=0)
    copies = np.zeros(len(labels), np.int64)
    # One stable sort instead of a scan per class: a thousand classes over a million rows stay cheap.
    by_class = np.split(np.argsort(labels, kind="stable"), np.cumsum(counts)[:-1])
    for c, rows in enumerate(by_class):
        if len(rows):
            base, extra = divmod(largest, len(rows))
            order = np.random.default_rng(derive_seed(seed, c, 0x0B)).permutation(len(rows))
            copies[rows] = base
            copies[rows[order[:extra]]] += 1
    return copies


def _picks(group: RowGroup) -> np.ndarray:
    return np.frombuffer(group.picks, np.int32) if group.picks is not None else np.arange(group.rows, dtype=np.int32)


def oversample_row_groups(groups: list[RowGroup], num_classes: int, seed: int) -> list[RowGroup]:
    """`data.balance: oversample`: `groups` with each row's position repeated in its group's picks
    (`copies_per_row`), and dense sample ids in file order. Each copy is then a sample of its own: the epoch
    plan trains it exactly once, and augmentation, seeded by sample id, transforms it differently. The copies
    are fixed for the run (the same rows repeated every epoch). Already balanced: `groups` itself."""
    per_group = map_files(_group_labels, list(groups))
    labels = np.concatenate(per_group) if per_group else np.zeros(0, np.int64)
    copies = copies_per_row(labels, num_classes, seed)
    present = np.count_nonzero(np.bincount(labels, minlength=num_classes))
    print(f"train: data.balance=oversample: {present} classes x {copies.sum() // max(present, 1)} = {copies.sum()} "
          f"samples an epoch (from {len(labels)} rows; copies per row {copies.min(initial=1)} to "
          f"{copies.max(initial=1)})", flush=True)
    if (copies == 1).all():
        return groups
    out, start, first = [], 0, 0
    for g, lab in zip(groups, per_group):
        # Repeats of sorted picks stay sorted: a group is still read once, in row order.
        picks = np.repeat(_picks(g), copies[start:start + len(lab)])
        start += len(lab)
        out.append(RowGroup(g.file, g.index, len(picks), first, picks.astype(np.int32).tobytes()))
        first += len(picks)
    return out
