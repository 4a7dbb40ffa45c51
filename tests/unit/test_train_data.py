"""The worker's loaders over streamed shards: decode in loader processes, per-sample augmentation seeds,
undecodable rows dropped in training and kept as placeholders in evaluation."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from imgcls_dist.data.augment import build_train_transform
from imgcls_dist.data.schema import validate_dataset
from imgcls_dist.data.shards import write_shards
from imgcls_dist.train.data import make_eval_loader, make_train_loader
from imgcls_dist.train.stream import list_row_groups


def _groups(digits_dir, n=64):
    return list_row_groups([f.uri for f in validate_dataset(digits_dir, ("train",))["files"]["train"]], limit=n)


def _train_loader(groups, rank=0, world=1, loader_workers=0, epoch=0):
    loader, ds, sampler = make_train_loader(
        groups, channels=3, transform=build_train_transform("standard", 1.0, 32, hflip=False, seed=0), image_size=32,
        batch_size=8, rank=rank, world=world, seed=0, shuffle_buffer=16, loader_workers=loader_workers)
    ds.set_epoch(epoch)
    sampler.set_epoch(epoch)
    return loader, ds


def _by_id(loader) -> dict[int, torch.Tensor]:
    return {int(i): img for images, _, ids, _ in loader for img, i in zip(images, ids)}


def test_augmentation_is_per_sample_and_epoch_whichever_process_decodes(digits_dir):
    groups = _groups(digits_dir)
    in_process = _by_id(_train_loader(groups, loader_workers=0)[0])
    two_procs = _by_id(_train_loader(groups, loader_workers=2)[0])
    assert sorted(in_process) == sorted(two_procs) == list(range(64))
    # The same (seed, epoch, sample): the same pixels, in the training process or in either loader process.
    assert all(torch.equal(in_process[i], two_procs[i]) for i in in_process)
    epoch1 = _by_id(_train_loader(groups, epoch=1)[0])
    assert sum(not torch.equal(in_process[i], epoch1[i]) for i in in_process) > 48  # new draws each epoch


def test_two_workers_stream_disjoint_rows(digits_dir):
    groups = _groups(digits_dir)
    a = set(_by_id(_train_loader(groups, rank=0, world=2)[0]))
    b = set(_by_id(_train_loader(groups, rank=1, world=2)[0]))
    assert not a & b and a | b == set(range(64))


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 20, 30)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def good_and_bad(tmp_path):
    files = write_shards([("good", _png(), 1), ("bad", b"garbage", 2)], tmp_path, rows_per_shard=10)
    return list_row_groups([f.uri for f in files])


def test_bad_rows_are_dropped_in_training_and_kept_as_placeholders_in_eval(good_and_bad):
    loader, ds, sampler = make_train_loader(good_and_bad, channels=3, transform=build_train_transform("none", 0.0, 8, hflip=False),
                                            image_size=8, batch_size=2, rank=0, world=1, seed=0, shuffle_buffer=0,
                                            loader_workers=0)
    images, labels, ids, nbad = next(iter(loader))
    assert nbad == 1 and labels.tolist() == [1] and images.shape == (1, 3, 8, 8)
    ev = make_eval_loader(good_and_bad, channels=3, image_size=8, batch_size=2, rank=0, world=1, loader_workers=0)
    images, labels, ids, nbad = next(iter(ev))
    assert labels.tolist() == [1, -1] and images.shape == (2, 3, 8, 8) and images.dtype == torch.uint8
    assert nbad == 1 and np.all(images[1].numpy() == 0)
