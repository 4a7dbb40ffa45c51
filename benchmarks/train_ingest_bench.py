"""`python -m benchmarks train-ingest`: the streaming training input against the in-memory one it replaced.

Same shards, same transforms, same DataLoader processes, no model (the input pipeline alone, as fast as it
can go):

- throughput ratio = samples/s of the streaming loader (train/stream.py: row groups read by a thread,
  shuffle buffer, encoded batches decoded in loader processes) / samples/s of the in-memory loader (every
  row's bytes read into the training process first, an index sampler, the same decode + augment). Goal >= 0.95.
- memory ratio = peak RSS (training process + loader processes) of the streaming loader over 4x the bytes of
  training shards / over 1x. Goal <= 1.10. The in-memory loader's ratio is printed beside it.
- the alternative we did not choose, on the smaller set: Ray Data reading the shards and decoding/augmenting
  in CPU tasks (as many as loader processes), iterated with iter_torch_batches.

The shards hold incompressible images (random-noise JPEGs), so bytes on disk are bytes in memory.
"""

from __future__ import annotations

import io
import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from benchmarks.common import Sampled, machine, print_table, rss_with_children
from imgcls_dist.data.augment import apply, build_train_transform, reseed
from imgcls_dist.data.seeds import derive_seed
from imgcls_dist.data.decode import decode_image
from imgcls_dist.data.shards import read_rows, write_shards
from imgcls_dist.train.data import collate_drop_bad, make_train_loader
from imgcls_dist.train.stream import list_row_groups


def noise_jpeg_rows(count: int, side: int = 256, seed: int = 0):
    rng = np.random.default_rng(seed)
    for i in range(count):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=90)
        yield f"noise-{i:08d}", buf.getvalue(), i % 10


def write_noise_shards(out: Path, gigabytes: float, side: int = 256) -> tuple[list[str], int]:
    per_row = len(next(noise_jpeg_rows(1, side))[1])
    rows = max(1, int(gigabytes * 2**30 / per_row))
    files = write_shards(noise_jpeg_rows(rows, side), out, rows_per_shard=2000)
    return [f.uri for f in files], rows


# ---------------------------------------------------------------- the in-memory loader (the baseline)


class _StridedSampler(Sampler):
    """The previous design: one epoch-seeded permutation of all rows, strided per worker."""

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.batch_size, self.seed = n, batch_size, seed

    def __len__(self) -> int:
        return math.ceil(self.n / self.batch_size)

    def __iter__(self):
        order = np.random.default_rng(derive_seed(self.seed, 0)).permutation(self.n)
        for chunk in np.array_split(order, len(self)):
            yield chunk.tolist()


class _InMemoryRows(Dataset):
    def __init__(self, rows, transform, image_size: int):
        self.rows, self.transform, self.image_size = rows, transform, image_size

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        # The same (reduced-size) decode as DecodeSamples: the comparison is of loaders, not decoders.
        res = decode_image(self.rows.images[i], min_size=self.image_size)
        reseed(self.transform, i)
        if res.array is None:
            return np.zeros((8, 8, 3), np.uint8), -1, i
        return apply(self.transform, res.array), int(self.rows.labels[i]), i


def streaming_loader(files: list[str], transform, *, image_size: int, batch_size: int, loader_workers: int,
                     shuffle_buffer: int) -> DataLoader:
    loader, ds, sampler = make_train_loader(
        list_row_groups(files), channels=3, transform=transform, image_size=image_size, batch_size=batch_size,
        rank=0, world=1, seed=0, shuffle_buffer=shuffle_buffer, loader_workers=loader_workers)
    ds.set_epoch(0)
    sampler.set_epoch(0)
    return loader


def in_memory_loader(files: list[str], transform, *, image_size: int, batch_size: int, loader_workers: int,
                     **_) -> DataLoader:
    rows = read_rows(files)
    return DataLoader(_InMemoryRows(rows, transform, image_size), batch_sampler=_StridedSampler(len(rows), batch_size, 0),
                      num_workers=loader_workers, collate_fn=collate_drop_bad)


def _decode_augment_batch(batch, image_size: int, transform):
    """Ray Data's version of the loader processes' work: decode + augment a batch of encoded rows."""
    import numpy as np  # noqa: F811 - imported in the Ray Data worker

    images, labels = [], []
    for data, label in zip(batch["image"], batch["label"]):
        res = decode_image(data, min_size=image_size)  # as DecodeSamples decodes
        images.append(apply(transform, res.array) if res.array is not None else np.zeros((image_size, image_size, 3),
                                                                                         np.uint8))
        labels.append(label)
    return {"image": np.stack(images), "label": np.asarray(labels)}


def ray_data_epoch(files: list[str], transform, *, image_size: int, batch_size: int, loader_workers: int,
                   **_) -> dict[str, float]:
    """The alternative design: Ray Data reads the shards and decodes/augments in CPU tasks (which a
    heterogeneous cluster could place on CPU-only nodes); the trainer iterates batches."""
    import ray

    from benchmarks.ray_data_compat import read_parquet
    from imgcls_dist.ray_utils import ensure_ray
    from imgcls_dist.storage import location

    ensure_ray()
    locs = [location(f) for f in files]
    ds = read_parquet([f.path for f in locs], filesystem=locs[0].fs, columns=["image", "label"], num_cpus=0.5)
    ds = ds.map_batches(_decode_augment_batch, fn_kwargs={"image_size": image_size, "transform": transform},
                        batch_size=batch_size, num_cpus=1, concurrency=max(1, loader_workers))
    t0, n = time.perf_counter(), 0
    for batch in ds.iter_torch_batches(batch_size=batch_size):
        n += len(batch["label"])
    ray.shutdown()
    return {"samples_per_s": n / (time.perf_counter() - t0), "samples": n}


def measure_epoch(make_loader, files: list[str], transform, **kw) -> dict[str, float]:
    """One pass over a fresh loader: samples/s, samples, RSS before it was built and at its peak (this
    process + its loader processes)."""
    with Sampled(rss_with_children, 0.05) as rss:
        base = rss.values[0]
        loader = make_loader(files, transform, **kw)
        t0, n = time.perf_counter(), 0
        for images, labels, _, _ in loader:
            n += len(labels)
        dt = time.perf_counter() - t0
        del loader
    return {"samples_per_s": n / dt, "samples": n, "base_rss": base, "peak_rss": max(rss.values),
            "growth_rss": max(rss.values) - base}


def _in_child(func: str, *args) -> Any:
    """Run `func(*args)` of this module in a fresh interpreter and return its JSON result: every measurement
    starts from a clean process (generating gigabytes of shards or a previous loader leave freed memory that
    the allocator keeps, which would be counted as the next loader's)."""
    import json
    import subprocess
    import sys

    code = ("import json, sys; import benchmarks.train_ingest_bench as b; "
            f"print(json.dumps(b.{func}(*json.loads(sys.argv[1]))))")
    out = subprocess.run([sys.executable, "-c", code, json.dumps(args)], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def write_noise_shards_json(out: str, gigabytes: float) -> list:
    files, n = write_noise_shards(Path(out), gigabytes)
    return [files, n]


def measure_json(kind: str, files: list[str], image_size: int, batch_size: int, loader_workers: int,
                 shuffle_buffer: int) -> dict:
    transform = build_train_transform("standard", 0.5, image_size, hflip=True, seed=0)
    kw = dict(image_size=image_size, batch_size=batch_size, loader_workers=loader_workers, shuffle_buffer=shuffle_buffer)
    if kind == "ray_data":
        return ray_data_epoch(files, transform, **kw)
    return measure_epoch(streaming_loader if kind == "streaming" else in_memory_loader, files, transform, **kw)


def bench_train_ingest(gigabytes: tuple[float, float] = (1.0, 4.0), image_size: int = 64, batch_size: int = 64,
                       loader_workers: int = 2, shuffle_buffer: int = 2048) -> dict[str, Any]:
    shm = Path("/dev/shm")  # a RAM disk when there is one: the VM's disk must not decide (see ingest_bench)
    work = Path(tempfile.mkdtemp(prefix="bench-train-ingest-", dir=shm if shm.is_dir() else None))
    rows_out = []
    try:
        for gb in gigabytes:
            files, n = _in_child("write_noise_shards_json", str(work / f"{gb:g}gb"), gb)
            kw = (image_size, batch_size, loader_workers, shuffle_buffer)
            st = _in_child("measure_json", "streaming", files, *kw)
            mem = _in_child("measure_json", "in_memory", files, *kw)
            assert st["samples"] == mem["samples"] == n, (st, mem, n)
            rd = _in_child("measure_json", "ray_data", files, *kw) if gb == gigabytes[0] else None
            rows_out.append({"shards_gb": gb, "rows": n, "stream_samples_per_s": st["samples_per_s"],
                             "memory_samples_per_s": mem["samples_per_s"],
                             "throughput_ratio": st["samples_per_s"] / mem["samples_per_s"],
                             "stream_peak_rss_gb": st["peak_rss"] / 2**30, "memory_peak_rss_gb": mem["peak_rss"] / 2**30,
                             "ray_data_samples_per_s": rd["samples_per_s"] if rd else None})
            shutil.rmtree(work / f"{gb:g}gb")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    small, big = rows_out[0], rows_out[-1]
    result = {"machine": machine(), "rows": rows_out,
              "throughput_ratio": min(r["throughput_ratio"] for r in rows_out),
              "stream_rss_ratio": big["stream_peak_rss_gb"] / small["stream_peak_rss_gb"],
              "memory_rss_ratio": big["memory_peak_rss_gb"] / small["memory_peak_rss_gb"]}
    print(f"training input, {image_size}px, batch {batch_size}, {loader_workers} loader processes ({machine()}):")
    print_table(rows_out, list(rows_out[0]))
    print(f"streaming / in-memory samples/s: {result['throughput_ratio']:.2f} (goal >= 0.95); peak RSS "
          f"{gigabytes[-1]:g} GB / {gigabytes[0]:g} GB of shards: streaming {result['stream_rss_ratio']:.2f} "
          f"(goal <= 1.10), in-memory {result['memory_rss_ratio']:.2f}")
    return result
