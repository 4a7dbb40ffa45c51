"""What a run's summary.json derives from its history."""

from __future__ import annotations

from imgcls_dist.train.job import epochs_to_reach


def test_epochs_to_reach_a_share_of_the_best_validation_accuracy():
    history = [{"val_acc": a} for a in (0.2, 0.85, 0.93, 0.9, 0.95)]
    assert epochs_to_reach(history, 0.95) == 3  # 0.93 >= 0.9025
    assert epochs_to_reach(history, 0.99) == 5  # 0.95 is the best; 0.93 < 0.9405
    assert epochs_to_reach(history, 0.5) == 2


def test_min_steps_adds_epochs_to_a_small_training_set_only(capsys):
    from imgcls_dist.config import build_config
    from imgcls_dist.train.job import resolve_epochs

    cfg = build_config({"data": {"batch_size": 16}, "train": {"epochs": 10, "min_steps": 500, "grad_accum_steps": 2}})
    # 100 rows on 2 workers: 50 each, 4 batches of 16 -> 2 optimizer steps an epoch -> 250 epochs
    assert resolve_epochs(cfg, 100, 2).train.epochs == 250
    assert "train.min_steps=500: 250 epochs of 2 optimizer steps (train.epochs=10)" in capsys.readouterr().out
    assert resolve_epochs(cfg, 100_000, 2).train.epochs == 10  # 1,563 steps an epoch: train.epochs stands
    assert resolve_epochs(resolve_epochs(cfg, 100, 2), 100, 2).train.epochs == 250  # idempotent
    assert resolve_epochs(cfg.model_copy(update={"train": cfg.train.model_copy(update={"min_steps": None})}),
                          100, 2).train.epochs == 10
