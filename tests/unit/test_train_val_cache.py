"""A worker's validation share is decoded once when it fits in memory (train/loop.py val_batches)."""

from types import SimpleNamespace

import torch

from imgcls_dist.train import loop


class CountingLoader:
    """Stands in for the eval DataLoader: yields its batches and counts the passes over them."""

    def __init__(self, batches):
        self.batches, self.passes = batches, 0

    def __iter__(self):
        self.passes += 1
        for images, labels in self.batches:
            yield images, labels, torch.arange(len(labels)), 0


def _run(n_batches=3):
    batches = [(torch.full((4, 1, 8, 8), i, dtype=torch.uint8), torch.tensor([i] * 4)) for i in range(n_batches)]
    return SimpleNamespace(val_loader=CountingLoader(batches), val_cache=None), batches


def _same(got, want):
    return len(got) == len(want) and all(torch.equal(a, c) and torch.equal(b, d) for (a, b), (c, d) in zip(got, want))


def test_a_share_that_fits_is_decoded_once_and_replayed_identically():
    run, batches = _run()
    for _ in range(3):
        assert _same(list(loop.val_batches(run)), batches)
    assert run.val_loader.passes == 1


def test_a_share_over_the_budget_is_decoded_every_pass(monkeypatch):
    monkeypatch.setattr(loop, "VAL_CACHE_BYTES", 2 * 4 * 64)  # two of the three batches
    run, batches = _run()
    for _ in range(2):
        assert _same(list(loop.val_batches(run)), batches)
    assert run.val_loader.passes == 2 and run.val_cache is None
