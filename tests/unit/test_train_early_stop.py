"""Early stopping's decision, from the validation accuracies of the epochs so far."""

import pytest

from imgcls_dist.train.early_stop import should_stop


@pytest.mark.parametrize("accs, patience, delta, stop", [
    ([0.5, 0.6, 0.6, 0.6], 2, 0.0, True),     # two epochs without beating 0.6
    ([0.5, 0.6, 0.6, 0.61], 2, 0.0, False),   # the last one beat it
    ([0.5, 0.6, 0.6, 0.61], 2, 0.02, True),   # ... but not by more than min_delta
    ([0.5, 0.6, 0.59], 2, 0.0, False),        # not yet `patience` epochs after a best
    ([0.9, 0.5, 0.4, 0.3], 3, 0.0, True),
    ([0.5, 0.6, 0.6, 0.6], None, 0.0, False),  # off
    ([], 1, 0.0, False),
])
def test_stops_after_patience_epochs_without_improvement(accs, patience, delta, stop):
    assert should_stop(accs, patience, delta) is stop
