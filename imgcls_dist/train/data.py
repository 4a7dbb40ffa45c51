"""Training/validation inputs for one Ray Train worker.

Sharding choice (why not accelerate's or Ray Data's split): accelerate's BatchSamplerShard and torch's
DistributedSampler pad the last batches by repeating samples, and Ray Data's streaming_split with
equal=True drops or balances rows — neither gives "each sample exactly once per epoch". Here every
worker takes a strided slice of one epoch-seeded permutation, and all workers cut their slice into
the same number of batches (sizes differ by at most one) so DDP's collectives never wait on a worker
that ran out of batches. Decode + augment run in DataLoader processes, overlapping the step.
"""

from __future__ import annotations

import math
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from imgcls_dist.data.augment import apply, build_eval_transform, build_train_transform, derive_seed, reseed
from imgcls_dist.data.decode import decode_image
from imgcls_dist.data.shards import ShardRows
from imgcls_dist.models.preprocess import stack_hwc


class ExactShardBatchSampler(Sampler[list[int]]):
    def __init__(self, n: int, rank: int, world: int, batch_size: int, seed: int, shuffle: bool = True):
        self.n, self.rank, self.world, self.batch_size, self.seed, self.shuffle = n, rank, world, batch_size, seed, shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def indices(self) -> np.ndarray:
        order = np.random.default_rng(derive_seed(self.seed, self.epoch)).permutation(self.n) if self.shuffle else np.arange(self.n)
        return order[self.rank :: self.world]

    def __len__(self) -> int:
        # Same on every rank: batches of the largest slice.
        return max(1, math.ceil(math.ceil(self.n / self.world) / self.batch_size))

    def __iter__(self) -> Iterator[list[int]]:
        mine = self.indices()
        for chunk in np.array_split(mine, len(self)):
            yield chunk.tolist()


class RowsDataset(Dataset):
    """Encoded rows -> (uint8 HWC image, label, row index). Undecodable rows come back as a blank
    placeholder with label -1: training drops them (counted) so one bad image never kills a run, and
    evaluation keeps them so accelerate's gather_for_metrics still knows where the padding starts."""

    def __init__(self, rows: ShardRows, channels: int, transform, size: int, seed: int = 0, rank: int = 0):
        self.rows, self.channels, self.transform, self.size = rows, channels, transform, size
        self.seed, self.rank, self.epoch = seed, rank, 0

    def __len__(self) -> int:
        return len(self.rows)

    def set_epoch(self, epoch: int, transform=None, size: int | None = None) -> None:
        self.epoch = epoch
        if transform is not None:
            self.transform, self.size = transform, size
        reseed(self.transform, derive_seed(self.seed, epoch, self.rank, 0xFFFF))

    def __getitem__(self, i: int):
        res = decode_image(self.rows.images[i], channels=self.channels)
        if res.array is None:
            return np.zeros((self.size, self.size, self.channels), np.uint8), -1, i
        return apply(self.transform, res.array), int(self.rows.labels[i]), i


def _worker_init(_: int) -> None:
    info = get_worker_info()
    ds: RowsDataset = info.dataset  # type: ignore[assignment]
    # Different augmentation stream per (epoch, Ray worker, loader process); workers restart every epoch.
    reseed(ds.transform, derive_seed(ds.seed, ds.epoch, ds.rank, info.id))
    torch.set_num_threads(1)


def collate_keep(batch):
    images = stack_hwc([b[0] for b in batch])
    labels = torch.tensor([b[1] for b in batch], dtype=torch.long)
    idx = torch.tensor([b[2] for b in batch], dtype=torch.long)
    return images, labels, idx


def collate_drop_bad(batch):
    good = [b for b in batch if b[1] >= 0]
    if not good:
        return None, None, None, len(batch)
    return (*collate_keep(good), len(batch) - len(good))


def make_train_loader(rows: ShardRows, *, channels: int, preset: str, strength: float, image_size: int, hflip: bool,
                      batch_size: int, rank: int, world: int, seed: int, loader_workers: int) -> tuple[DataLoader, RowsDataset, ExactShardBatchSampler]:
    tf = build_train_transform(preset, strength, image_size, hflip=hflip, seed=seed)
    ds = RowsDataset(rows, channels, tf, image_size, seed=seed, rank=rank)
    sampler = ExactShardBatchSampler(len(rows), rank, world, batch_size, seed)
    loader = DataLoader(ds, batch_sampler=sampler, num_workers=loader_workers, collate_fn=collate_drop_bad,
                        worker_init_fn=_worker_init if loader_workers else None, persistent_workers=False,
                        pin_memory=torch.cuda.is_available())
    return loader, ds, sampler


def make_eval_loader(rows: ShardRows, *, channels: int, image_size: int, batch_size: int, loader_workers: int) -> DataLoader:
    ds = RowsDataset(rows, channels, build_eval_transform(image_size), image_size)
    return DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=loader_workers, collate_fn=collate_keep,
                      pin_memory=torch.cuda.is_available())
