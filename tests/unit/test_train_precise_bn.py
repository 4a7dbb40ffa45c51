"""Precise BatchNorm statistics before validation (train/precise_bn.py)."""

import torch
from torch import nn

from imgcls_dist.train.precise_bn import recalibrate_bn


def _loader(batches):
    for x in batches:
        yield x, torch.zeros(len(x), dtype=torch.long), torch.arange(len(x)), 0


def _batches(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (4, 1, 6, 6), generator=g, dtype=torch.uint8) for _ in range(n)]


def test_statistics_are_the_average_over_the_first_batches_and_frozen_layers_keep_theirs():
    model = nn.Sequential(nn.BatchNorm2d(1), nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))
    frozen = model[2]
    for p in frozen.parameters():
        p.requires_grad_(False)
    frozen.running_mean.fill_(7.0)
    batches = _batches(4)
    recalibrate_bn(model, _loader(batches), limit=3, device="cpu", mean=[0.5], std=[0.25])
    x = torch.cat([((b.float() / 255) - 0.5) / 0.25 for b in batches[:3]])  # the 4th batch is beyond the limit
    # update_bn's cumulative average over equal-sized batches is the mean of their means
    assert torch.allclose(model[0].running_mean, x.mean(dim=(0, 2, 3)), atol=1e-5)
    assert torch.equal(frozen.running_mean, torch.full((2,), 7.0)) and frozen.momentum == 0.1
    assert model[0].momentum == 0.1  # put back after the cumulative pass


def test_rows_without_a_label_are_left_out():
    model = nn.Sequential(nn.BatchNorm2d(1))
    good, bad = torch.full((2, 1, 4, 4), 255, dtype=torch.uint8), torch.zeros((2, 1, 4, 4), dtype=torch.uint8)
    loader = [(torch.cat([good, bad]), torch.tensor([1, 1, -1, -1]), torch.arange(4), 2)]
    recalibrate_bn(model, loader, limit=1, device="cpu", mean=[0.0], std=[1.0])
    assert torch.allclose(model[0].running_mean, torch.ones(1))  # only the white (labelled) rows
