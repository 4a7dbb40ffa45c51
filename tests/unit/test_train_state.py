"""Per-worker epoch bookkeeping: which samples a worker trained is a bitmap of fixed size, exact, and survives
a checkpoint."""

from __future__ import annotations

import numpy as np
import torch

from imgcls_dist.train.state import EpochStats, count_unique


def test_the_bitmap_counts_distinct_ids_across_workers_and_sees_a_repeat():
    a, b = EpochStats(), EpochStats()
    for ids in np.array_split(np.random.default_rng(0).permutation(1000), 20):
        (a if ids[0] % 2 else b).mark_seen(ids)
    assert count_unique([a.seen_bits, b.seen_bits]) == 1000
    b.mark_seen(np.array([0, 999, 999]))  # ids trained again (and twice in one batch)
    assert count_unique([a.seen_bits, b.seen_bits]) == 1000  # a repeat adds nothing: seen > unique shows it
    assert count_unique([a.seen_bits]) + count_unique([b.seen_bits]) >= 1000


def test_its_memory_is_bounded_by_the_largest_id_not_by_the_rows_streamed():
    s = EpochStats()
    for _ in range(200):  # 200 passes over the same 10,000 ids: 2M samples streamed
        s.mark_seen(np.arange(10_000))
    assert len(s.seen_bits) <= 2 * 10_000 // 8 + 1
    assert count_unique([s.seen_bits]) == 10_000


def test_it_round_trips_through_a_checkpoint(tmp_path):
    s = EpochStats(loss_sum=1.5, correct=3, seen=4, skipped_rows=1, seconds=2.0)
    s.mark_seen(np.array([3, 17, 4096]))
    torch.save(s.to_state(), tmp_path / "state.pt")
    back = EpochStats.from_state(torch.load(tmp_path / "state.pt", weights_only=True))
    assert np.array_equal(back.seen_bits, s.seen_bits) and back.seen == 4 and back.loss_sum == 1.5
    assert count_unique([back.seen_bits]) == 3


def test_a_mid_epoch_checkpoint_with_the_ids_listed_still_resumes():
    """Checkpoints written before the bitmap stored the ids themselves (`seen_idx`)."""
    old = {"loss_sum": 1.0, "correct": 2, "seen": 3, "skipped_rows": 0, "seconds": 1.0,
           "seen_idx": torch.tensor([5, 9, 700], dtype=torch.int64)}
    back = EpochStats.from_state(old)
    assert back.seen == 3 and count_unique([back.seen_bits]) == 3
    back.mark_seen(np.array([9, 10]))
    assert count_unique([back.seen_bits]) == 4
