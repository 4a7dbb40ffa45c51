"""Training/validation loaders of one Ray Train worker, over the streamed shards of `train/stream.py`.

The batch sampler (`stream.EpochBatches`) runs in the training process and hands whole batches of encoded
samples to `loader_workers` DataLoader processes, which decode and augment them while the step runs.
Undecodable rows come back as a blank placeholder with label -1: training drops them (counted) so one
bad image never kills a run; evaluation does not count them.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from imgcls_dist.data.augment import apply, build_eval_transform, reseed
from imgcls_dist.data.seeds import derive_seed
from imgcls_dist.data.decode import decode_image
from imgcls_dist.models.preprocess import stack_hwc
from imgcls_dist.train.row_group import RowGroup
from imgcls_dist.train.stream import EpochBatches, Sample


class DecodeSamples(Dataset):
    """(sample id, encoded bytes, label) -> (uint8 HWC image, label, sample id). Each sample's augmentation
    is seeded by (seed, epoch, sample id): the same in whichever loader process decodes it, and on resume."""

    def __init__(self, channels: int, transform, size: int, seed: int = 0, seeded: bool = True):
        self.channels, self.transform, self.size, self.seed, self.seeded = channels, transform, size, seed, seeded
        self.epoch = 0

    def set_epoch(self, epoch: int, transform=None, size: int | None = None) -> None:
        self.epoch = epoch
        if transform is not None:
            self.transform, self.size = transform, size

    def __len__(self) -> int:  # batches come from the batch sampler; the DataLoader never asks for a length
        raise TypeError("DecodeSamples is indexed by samples from the batch sampler")

    def __getitem__(self, sample: Sample):
        sid, data, label = sample
        # min_size: the train and the eval transform both resize to `size` before anything else
        # (augment.py), so a JPEG decoded at the coarsest DCT scale that still covers `size` is all they
        # need (far faster on large photos: docs/benchmarks.md, "Reduced-size JPEG decode"), and
        # predictor/prepare.py decodes the same way. Progressive resizing changes `size` through set_epoch.
        res = decode_image(data, channels=self.channels, min_size=self.size)
        if res.array is None:
            return np.zeros((self.size, self.size, self.channels), np.uint8), -1, sid
        if self.seeded:
            reseed(self.transform, derive_seed(self.seed, self.epoch, sid))
        return apply(self.transform, res.array), label, sid


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)


def collate_keep(batch):
    """-> (images uint8 NCHW, labels, sample ids, undecodable rows); placeholders stay (evaluation)."""
    images = stack_hwc([b[0] for b in batch])
    labels = torch.tensor([b[1] for b in batch], dtype=torch.long)
    ids = torch.tensor([b[2] for b in batch], dtype=torch.long)
    return images, labels, ids, int((labels < 0).sum())


def collate_drop_bad(batch):
    """Training: undecodable rows leave the batch (counted); a batch of nothing but bad rows keeps its
    placeholders (all labels -1), which the loop turns into a step that changes no weight."""
    good = [b for b in batch if b[1] >= 0]
    images, labels, ids, _ = collate_keep(good or batch)
    return images, labels, ids, len(batch) - len(good)


def _loader(dataset: Dataset, sampler: EpochBatches, loader_workers: int, collate) -> DataLoader:
    return DataLoader(dataset, batch_sampler=sampler, num_workers=loader_workers, collate_fn=collate,
                      worker_init_fn=_worker_init if loader_workers else None, persistent_workers=False,
                      pin_memory=torch.cuda.is_available())


def make_train_loader(groups: list[RowGroup], *, channels: int, transform, image_size: int, batch_size: int,
                      rank: int, world: int, seed: int, shuffle_buffer: int,
                      loader_workers: int) -> tuple[DataLoader, DecodeSamples, EpochBatches]:
    dataset = DecodeSamples(channels, transform, image_size, seed=seed)
    sampler = EpochBatches(groups, batch_size=batch_size, rank=rank, world=world, seed=seed, buffer=shuffle_buffer)
    return _loader(dataset, sampler, loader_workers, collate_drop_bad), dataset, sampler


def make_eval_loader(groups: list[RowGroup], *, channels: int, image_size: int, batch_size: int, rank: int,
                     world: int, loader_workers: int) -> DataLoader:
    """This rank's contiguous share of the split, in order (metrics are summed across ranks)."""
    dataset = DecodeSamples(channels, build_eval_transform(image_size), image_size, seeded=False)
    sampler = EpochBatches(groups, batch_size=batch_size, rank=rank, world=world, seed=0, buffer=0, shuffle=False)
    return _loader(dataset, sampler, loader_workers, collate_keep)
