"""What a run's summary.json derives from its history."""

from __future__ import annotations

from imgcls_dist.train.job import epochs_to_reach


def test_epochs_to_reach_a_share_of_the_best_validation_accuracy():
    history = [{"val_acc": a} for a in (0.2, 0.85, 0.93, 0.9, 0.95)]
    assert epochs_to_reach(history, 0.95) == 3  # 0.93 >= 0.9025
    assert epochs_to_reach(history, 0.99) == 5  # 0.95 is the best; 0.93 < 0.9405
    assert epochs_to_reach(history, 0.5) == 2
