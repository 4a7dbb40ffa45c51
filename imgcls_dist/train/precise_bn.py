"""Precise BatchNorm statistics (`train.precise_bn_batches`): before each validation, the running mean and variance
of every trained BatchNorm layer are re-estimated from that many un-augmented training batches
(torch.optim.swa_utils.update_bn: a cumulative average over the batches, not a momentum one).

Why: running statistics follow the weights with momentum 0.1 per step. On a small training set an epoch is a few
steps, so after several epochs they still mix the random start with weights that have moved since, and a
network that fits its training images can score chance on validation (val loss 10x its training loss) until
they catch up. Frozen layers (`model.transfer`) keep their pretrained statistics: update_bn resets every
BatchNorm, so theirs are put back.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import nn
from torch.optim.swa_utils import update_bn

from imgcls_dist.models.preprocess import normalize


def _frozen_bn(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            and not any(p.requires_grad for p in m.parameters(recurse=False))]


def _batches(loader, limit: int, device, mean, std, channels_last: bool) -> Iterator[torch.Tensor]:
    for i, (images, labels, _, _) in enumerate(loader):
        if i >= limit:
            return
        yield normalize(images[labels >= 0].to(device), mean, std, channels_last=channels_last)


@torch.no_grad()
def recalibrate_bn(model: nn.Module, loader, limit: int, device, mean, std, channels_last: bool = False) -> None:
    """Re-estimate `model`'s trained BatchNorm statistics from the first `limit` batches of `loader`."""
    kept = [(m, {k: v.clone() for k, v in m.named_buffers()}) for m in _frozen_bn(model)]
    update_bn(_batches(loader, limit, device, mean, std, channels_last), model)
    for m, buffers in kept:
        for k, v in buffers.items():
            getattr(m, k).copy_(v)
