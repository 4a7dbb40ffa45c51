"""Stratified, nested training subsets (`data.train_per_class`, `data.train_fraction`): exact per-class
counts, nested across sizes for one seed, other draws for other seeds, validation and test untouched, and
every picked row streamed exactly once with 1 and 2 workers."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from imgcls_dist.config import load_config
from imgcls_dist.data.shards import write_shards
from imgcls_dist.errors import UserError
from imgcls_dist.train.job import resolve_dataset
from imgcls_dist.train.stream import EpochBatches, group_rows, list_row_groups
from imgcls_dist.train.subset import oversample_row_groups, subset_row_groups

CLASSES = ["a", "b", "c", "d"]
PER_CLASS = {0: 40, 1: 25, 2: 12, 3: 3}  # imbalanced: class d has fewer rows than most subsets ask for


def rows(prefix: str):
    order = [c for c, n in PER_CLASS.items() for _ in range(n)]
    np.random.default_rng(1).shuffle(order)  # classes interleaved across files and row groups
    for i, c in enumerate(order):
        yield f"{prefix}-{i:04d}", f"{prefix}-{i:04d}".encode(), c  # the "image" bytes name the row


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("subset")
    for split in ("train", "val", "test"):
        write_shards(rows(split), root / split, rows_per_shard=30)  # 3 files; row groups of up to 128 rows
    (root / "dataset.json").write_text(json.dumps({"classes": CLASSES}))
    return root


def train_files(dataset: Path) -> list[str]:
    return sorted(str(p) for p in (dataset / "train").glob("*.parquet"))


def picked_ids(groups) -> list[str]:
    """The `id` of every row the subset's row groups take, in sample-id order."""
    out = []
    for g in groups:
        t = pq.ParquetFile(g.file).read_row_group(g.index, columns=["id"])
        picks = np.frombuffer(g.picks, np.int32) if g.picks is not None else np.arange(g.rows)
        out += [t.column("id")[int(p)].as_py() for p in picks]
    return out


def labels_of(dataset: Path) -> dict[str, int]:
    return {rid: c for rid, _, c in rows("train")}


def test_exactly_k_of_every_class_that_has_k_and_all_of_one_that_has_fewer(dataset, capsys):
    groups = subset_row_groups(train_files(dataset), CLASSES, seed=0, per_class=10)
    counts = Counter(labels_of(dataset)[i] for i in picked_ids(groups))
    assert counts == {0: 10, 1: 10, 2: 10, 3: 3}
    assert "data.train_per_class=10: 1 class(es) have fewer training rows and are taken whole: d (3)" in \
        capsys.readouterr().err
    assert [g.first_id for g in groups] == list(np.cumsum([0] + [g.rows for g in groups[:-1]]))  # dense ids


def test_a_fraction_takes_that_share_of_each_class(dataset):
    groups = subset_row_groups(train_files(dataset), CLASSES, seed=0, fraction=0.5)
    counts = Counter(labels_of(dataset)[i] for i in picked_ids(groups))
    assert counts == {0: 20, 1: 12, 2: 6, 3: 2}  # round(0.5 x 40, 25, 12, 3), half to even


def test_smaller_subsets_are_inside_larger_ones_for_a_seed_and_seeds_draw_differently(dataset):
    files = train_files(dataset)
    small = set(picked_ids(subset_row_groups(files, CLASSES, seed=7, per_class=5)))
    large = set(picked_ids(subset_row_groups(files, CLASSES, seed=7, per_class=20)))
    other = set(picked_ids(subset_row_groups(files, CLASSES, seed=8, per_class=5)))
    assert small < large
    assert other != small and len(other) == len(small)


def test_more_per_class_than_any_class_has_is_a_one_line_error(dataset):
    with pytest.raises(UserError, match=r"^data.train_per_class: 41 per class is more than any class has "
                                        r"\(largest: 40 training rows\)$"):
        subset_row_groups(train_files(dataset), CLASSES, seed=0, per_class=41)


def test_the_config_picks_the_subset_and_leaves_validation_whole(dataset):
    cfg = load_config(None, [f"data.path={dataset}", "model.arch=lenet5", "data.train_per_class=6",
                             "data.subset_seed=3"])
    ds = resolve_dataset(cfg)
    assert ds["train_rows"] == 6 + 6 + 6 + 3
    assert sum(g.rows for g in ds["val_groups"]) == sum(PER_CLASS.values())
    assert set(picked_ids(ds["train_groups"])) == set(picked_ids(subset_row_groups(
        train_files(dataset), CLASSES, seed=3, per_class=6)))


@pytest.mark.parametrize("world", [1, 2])
def test_every_picked_row_is_streamed_exactly_once_with_its_label(dataset, world):
    groups = subset_row_groups(train_files(dataset), CLASSES, seed=0, per_class=9)
    seen = streamed_ids(dataset, groups, world, batch_size=4, buffer=8, epoch=1)
    assert sorted(seen) == list(range(len(picked_ids(groups))))


def streamed_ids(dataset, groups, world: int, *, batch_size: int, buffer: int, epoch: int) -> list[int]:
    """The sample ids every rank's epoch streams, each checked to carry its own row's image and label."""
    ids, labels = picked_ids(groups), labels_of(dataset)
    seen = []
    for rank in range(world):
        sampler = EpochBatches(groups, batch_size=batch_size, rank=rank, world=world, seed=0, buffer=buffer)
        sampler.set_epoch(epoch)
        for batch in sampler:
            for sid, image, label in batch:
                assert image.decode() == ids[sid] and label == labels[ids[sid]]
                seen.append(sid)
    return seen



def test_balanced_class_weights_count_the_rows_the_run_trains_on(dataset):
    from imgcls_dist.train.stream import list_row_groups
    from imgcls_dist.train.subset import balanced_class_weights

    n = sum(PER_CLASS.values())  # 80 rows: 40 / 25 / 12 / 3
    weights = balanced_class_weights(list_row_groups(train_files(dataset)), len(CLASSES))
    assert weights == pytest.approx([n / (4 * PER_CLASS[c]) for c in range(4)])
    # a subset of at most 10 per class: 10 / 10 / 10 / 3 rows -> the rare class weighs 33 / (4 x 3)
    groups = subset_row_groups(train_files(dataset), CLASSES, seed=0, per_class=10)
    assert balanced_class_weights(groups, len(CLASSES)) == pytest.approx([33 / 40] * 3 + [33 / 12])
    cfg = load_config(None, [f"data.path={dataset}", "train.class_weights=balanced", "data.train_per_class=10",
                             "model.arch=lenet5", "data.image_size=16"])
    assert resolve_dataset(cfg)["class_weights"] == pytest.approx([33 / 40] * 3 + [33 / 12])


def whole_split(dataset: Path):
    return list_row_groups(train_files(dataset))


def test_oversampling_gives_every_class_the_largest_class_count_by_repeating_rows(dataset, capsys):
    groups = oversample_row_groups(whole_split(dataset), len(CLASSES), seed=0)
    ids = picked_ids(groups)
    labels = labels_of(dataset)
    assert Counter(labels[i] for i in ids) == {c: 40 for c in range(4)}
    assert set(ids) == set(labels)  # every row stays, none is dropped
    # a row of a class with n rows: 40 // n times, or once more (40 % n of them)
    per_row = Counter(ids)
    for c, n in PER_CLASS.items():
        copies = Counter(per_row[i] for i in labels if labels[i] == c)
        assert copies == ({40 // n: n - 40 % n, 40 // n + 1: 40 % n} if 40 % n else {40 // n: n})
    for g in groups:
        picks = np.frombuffer(g.picks, np.int32)
        assert len(picks) == g.rows and (np.diff(picks) >= 0).all()  # sorted: the group is still read in order
    assert [g.first_id for g in groups] == list(np.cumsum([0] + [g.rows for g in groups[:-1]]))  # dense ids
    assert "train: data.balance=oversample: 4 classes x 40 = 160 samples an epoch (from 80 rows; copies per row " \
           "1 to 14)" in capsys.readouterr().out


def test_the_extra_copies_are_drawn_by_the_seed(dataset):
    def extras(seed):
        return picked_ids(oversample_row_groups(whole_split(dataset), len(CLASSES), seed=seed))

    assert extras(5) == extras(5)
    assert extras(5) != extras(6) and Counter(extras(5)).total() == Counter(extras(6)).total() == 160


def test_oversampling_a_subset_balances_the_subset_and_a_balanced_input_is_left_as_it_is(dataset):
    subset = subset_row_groups(train_files(dataset), CLASSES, seed=0, per_class=10)  # 10 / 10 / 10 / 3 rows
    ids = picked_ids(oversample_row_groups(subset, len(CLASSES), seed=0))
    labels = labels_of(dataset)
    assert Counter(labels[i] for i in ids) == {c: 10 for c in range(4)}
    assert set(ids) == set(picked_ids(subset))
    assert sorted(Counter(i for i in ids if labels[i] == 3).values()) == [3, 3, 4]
    balanced = subset_row_groups(train_files(dataset), CLASSES, seed=0, per_class=3)
    assert oversample_row_groups(balanced, len(CLASSES), seed=0) is balanced


def test_a_repeated_row_is_read_once_per_copy(dataset):
    groups = oversample_row_groups(whole_split(dataset), len(CLASSES), seed=0)
    for g in groups:
        table = pq.ParquetFile(g.file).read_row_group(g.index)
        got = group_rows(table, g).column("id").to_pylist()
        assert got == [table.column("id")[int(p)].as_py() for p in np.frombuffer(g.picks, np.int32)]
        assert len(got) == g.rows > len(set(got))  # the rare classes' rows come several times


@pytest.mark.parametrize("world", [1, 2])
def test_every_copy_is_a_sample_streamed_exactly_once(dataset, world):
    groups = oversample_row_groups(whole_split(dataset), len(CLASSES), seed=0)
    seen = streamed_ids(dataset, groups, world, batch_size=8, buffer=16, epoch=2)
    assert sorted(seen) == list(range(160))


def test_the_config_oversamples_before_the_class_weights_count_the_rows(dataset):
    cfg = load_config(None, [f"data.path={dataset}", "model.arch=lenet5", "data.balance=oversample",
                             "train.class_weights=balanced"])
    ds = resolve_dataset(cfg)
    assert ds["train_rows"] == 4 * 40
    assert ds["class_weights"] == pytest.approx([1.0] * 4)  # balanced samples: nothing left to weigh
    plain = resolve_dataset(load_config(None, [f"data.path={dataset}", "model.arch=lenet5"]))
    assert plain["train_rows"] == 80 and all(g.picks is None for g in plain["train_groups"])
