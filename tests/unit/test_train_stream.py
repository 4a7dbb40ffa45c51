"""Streaming training input: every sample exactly once per epoch across workers, equal batch counts,
deterministic order that changes between epochs, mid-epoch skip, constant memory."""

from __future__ import annotations

from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from imgcls_dist.data.schema import ID, IMAGE, LABEL, SHARD_SCHEMA
from imgcls_dist.train.stream import EpochBatches, epoch_plan, list_row_groups, total_rows


def write_uneven_shards(root, sizes_per_file: list[list[int]]) -> list[str]:
    """Files whose row groups have the given sizes; labels = global row number % 7, image = its id as bytes."""
    files, n = [], 0
    for k, sizes in enumerate(sizes_per_file):
        path = root / f"part-{k:05d}.parquet"
        with pq.ParquetWriter(path, SHARD_SCHEMA) as w:
            for size in sizes:
                ids = list(range(n, n + size))
                w.write_table(pa.table({ID: [f"r{i}" for i in ids], IMAGE: [str(i).encode() for i in ids],
                                        LABEL: [i % 7 for i in ids]}, schema=SHARD_SCHEMA))
                n += size
        files.append(str(path))
    return files


SHARDS = [[7, 5, 9], [3], [11, 2, 2, 6], [1, 8]]  # 4 files, 10 row groups, 54 rows: nothing divides evenly


def epoch_samples(groups, world, epoch, buffer, batch_size=4, seed=0):
    per_rank = []
    for rank in range(world):
        b = EpochBatches(groups, batch_size=batch_size, rank=rank, world=world, seed=seed, buffer=buffer)
        b.set_epoch(epoch)
        per_rank.append([list(batch) for batch in b])
    return per_rank


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("buffer", [0, 16])
def test_every_sample_exactly_once_per_epoch_with_equal_batch_counts(tmp_path, world, buffer):
    groups = list_row_groups(write_uneven_shards(tmp_path, SHARDS))
    n = total_rows(groups)
    assert n == 54 and len(groups) == 10
    for epoch in range(3):
        per_rank = epoch_samples(groups, world, epoch, buffer)
        counts = Counter(s[0] for batches in per_rank for batch in batches for s in batch)
        assert sorted(counts) == list(range(n)) and set(counts.values()) == {1}  # per sample id, not totals
        assert len({len(batches) for batches in per_rank}) == 1  # same number of batches on every rank
        sizes = [len(b) for batches in per_rank for b in batches]
        assert max(sizes) - min(sizes) <= 1
        for batches in per_rank:  # the bytes and label travel with their id
            assert all(s[1] == str(s[0]).encode() and s[2] == s[0] % 7 for batch in batches for s in batch)


def test_order_changes_between_epochs_and_repeats_across_reruns(tmp_path):
    groups = list_row_groups(write_uneven_shards(tmp_path, SHARDS))
    flat = lambda per_rank: [s[0] for batches in per_rank for batch in batches for s in batch]  # noqa: E731
    e0, e1 = flat(epoch_samples(groups, 2, 0, 16)), flat(epoch_samples(groups, 2, 1, 16))
    assert e0 != e1
    assert flat(epoch_samples(groups, 2, 0, 16)) == e0  # same (seed, epoch, world): same order
    assert flat(epoch_samples(groups, 2, 0, 16, seed=1)) != e0


def test_the_buffer_mixes_rows_across_row_groups(tmp_path):
    groups = list_row_groups(write_uneven_shards(tmp_path, [[50] * 8]))
    plain = [s[0] for b in epoch_samples(groups, 1, 0, 0, batch_size=400)[0] for s in b]
    mixed = [s[0] for b in epoch_samples(groups, 1, 0, 64, batch_size=400)[0] for s in b]
    # without a buffer, row groups come out whole (permuted); with one, neighbours come from other groups
    same_group = lambda order: sum(a // 50 == b // 50 for a, b in zip(order, order[1:])) / (len(order) - 1)  # noqa: E731
    assert same_group(plain) > 0.95 and same_group(mixed) < 0.5


def test_resume_skips_exactly_what_was_trained(tmp_path):
    groups = list_row_groups(write_uneven_shards(tmp_path, SHARDS))
    full = EpochBatches(groups, batch_size=4, rank=1, world=2, seed=0, buffer=16)
    full.set_epoch(2)
    batches = list(full)
    done = sum(len(b) for b in batches[:3])
    resumed = EpochBatches(groups, batch_size=4, rank=1, world=2, seed=0, buffer=16)
    resumed.set_epoch(2, skip=done)
    assert list(resumed) == batches[3:]


def _samplers(groups, world, epoch, rest=None):
    out = []
    for rank in range(world):
        b = EpochBatches(groups, batch_size=4, rank=rank, world=world, seed=0, buffer=16)
        b.set_epoch(epoch, rest=rest)
        out.append(b)
    return out


@pytest.mark.parametrize("worlds", [(2, 1), (1, 2), (3, 2), (2, 3), (2, 2), (2, 1, 3), (3, 1, 2)])
def test_an_epoch_resumed_on_other_worlds_trains_every_sample_once(tmp_path, worlds):
    """An epoch begun on worlds[0] workers, checkpointed after some batches, resumed on worlds[1] (its rest re-cut)
    and, when given, checkpointed again and finished on worlds[2]: every sample once, in total, and every
    world's ranks with equal batch counts."""
    groups = list_row_groups(write_uneven_shards(tmp_path, SHARDS))
    trained: list[int] = []
    rest = None
    for i, world in enumerate(worlds):
        samplers = _samplers(groups, world, epoch=1, rest=rest)
        per_rank = [list(b) for b in samplers]
        assert len({len(batches) for batches in per_rank}) == 1
        last = i == len(worlds) - 1
        done = len(per_rank[0]) if last else max(1, len(per_rank[0]) // 3)
        trained += [s[0] for batches in per_rank for batch in batches[:done] for s in batch]
        if not last:
            rest = samplers[0].progress(done)
            assert all(b.progress(done) == rest for b in samplers)  # every rank computes the same progress
            assert rest.world == worlds[0] and rest.recut == (i > 0)
    counts = Counter(trained)
    assert sorted(counts) == list(range(54)) and set(counts.values()) == {1}


def test_progress_of_an_epoch_on_its_own_world_is_what_a_skip_resumes(tmp_path):
    groups = list_row_groups(write_uneven_shards(tmp_path, SHARDS))
    samplers = _samplers(groups, 2, epoch=2)
    p = samplers[1].progress(3)
    assert p.world == 2 and not p.recut and p.consumed[1] == sum(samplers[1].sizes()[:3])
    full = list(samplers[1])
    resumed = EpochBatches(groups, batch_size=4, rank=1, world=2, seed=0, buffer=16)
    resumed.set_epoch(2, skip=p.consumed[1])
    assert list(resumed) == full[3:]


def test_plan_reads_whole_row_groups_except_at_the_ends(tmp_path):
    groups = list_row_groups(write_uneven_shards(tmp_path, SHARDS))
    for rank in range(3):
        spans = epoch_plan(groups, seed=0, epoch=0, rank=rank, world=3)
        inner = spans[1:-1]
        assert all(s.start == 0 and s.stop == s.group.rows for s in inner)
        assert sum(s.stop - s.start for s in spans) == 18


def test_limit_keeps_the_first_rows(tmp_path):
    groups = list_row_groups(write_uneven_shards(tmp_path, SHARDS), limit=20)
    assert total_rows(groups) == 20 and [g.rows for g in groups] == [7, 5, 8]
