"""Early stopping on validation accuracy: `train.early_stop_patience` epochs in a row without beating the best
accuracy before them by more than `train.early_stop_min_delta` end the run.

A pure function of the run's history, so every worker takes the same decision from the same (all-reduced)
numbers, and a resumed run decides again from the history its checkpoint holds: a run that stopped early
stays stopped. Hand-written because neither accelerate nor Ray Train has one for a custom loop (Tune's
stoppers act on trials, not on a plain `train` run).
"""

from __future__ import annotations

from typing import Sequence


def should_stop(val_accs: Sequence[float], patience: int | None, min_delta: float = 0.0) -> bool:
    """True when the last `patience` epochs all stayed within `min_delta` of the best epoch before them."""
    if not patience or len(val_accs) <= patience:
        return False
    best_before = max(val_accs[:-patience])
    return max(val_accs[-patience:]) <= best_before + min_delta
