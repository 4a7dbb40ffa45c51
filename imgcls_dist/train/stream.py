"""Streaming, sharded training input: each worker reads only its share of the row groups, in constant memory.

`list_row_groups` plans from the footers; `epoch_plan` gives each rank a contiguous share of the epoch's
permuted row sequence (every sample exactly once, equal batch counts on every rank); `EpochBatches`, the
DataLoader's batch sampler, streams it through a seeded shuffle buffer and can start mid-epoch on resume.
Design: docs/design.md, "Streaming the training input".
"""

from __future__ import annotations

import math
import queue
import threading
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import pyarrow.parquet as pq

from imgcls_dist.data.schema import IMAGE, LABEL, map_files
from imgcls_dist.data.seeds import derive_seed
from imgcls_dist.storage import location
from imgcls_dist.train.row_group import RowGroup

PREFETCH_GROUPS = 2  # row groups read ahead of the one being consumed


@dataclass(frozen=True)
class Span:
    group: RowGroup
    start: int  # rows [start, stop) of the group
    stop: int


Sample = tuple[int, bytes, int]  # (global sample id, encoded image, label or -1)


def _row_counts(uri: str) -> list[int]:
    f = location(uri)
    md = pq.ParquetFile(f.path, filesystem=f.fs).metadata
    return [md.row_group(i).num_rows for i in range(md.num_row_groups)]


def list_row_groups(files: Sequence[str], limit: int | None = None) -> list[RowGroup]:
    """Row groups of `files` from their footers (no data read, footers fetched in parallel: on an object
    store each is a round trip); `limit` keeps the first rows only."""
    counts = map_files(_row_counts, files)
    out, first = [], 0
    for uri, per_group in zip(files, counts):
        for i, rows in enumerate(per_group):
            if limit is not None:
                if first >= limit:
                    return out
                rows = min(rows, limit - first)
            if rows:
                out.append(RowGroup(uri, i, rows, first))
                first += rows
    return out


def total_rows(groups: Sequence[RowGroup]) -> int:
    return sum(g.rows for g in groups)


def epoch_plan(groups: Sequence[RowGroup], *, seed: int, epoch: int, rank: int, world: int,
               shuffle: bool = True) -> list[Span]:
    """This rank's contiguous share of the epoch's permuted row sequence (docs/design.md, "Streaming the
    training input")."""
    order = (np.random.default_rng(derive_seed(seed, epoch, 0x9A)).permutation(len(groups)) if shuffle
             else np.arange(len(groups)))
    n = total_rows(groups)
    lo, hi = rank * n // world, (rank + 1) * n // world
    spans, offset = [], 0
    for i in order:
        g = groups[int(i)]
        a, b = max(lo, offset), min(hi, offset + g.rows)
        if a < b:
            spans.append(Span(g, a - offset, b - offset))
        offset += g.rows
        if offset >= hi:
            break
    return spans


def rank_rows(n: int, rank: int, world: int) -> int:
    return (rank + 1) * n // world - rank * n // world


def batches_per_epoch(n: int, world: int, batch_size: int) -> int:
    """The same on every rank: batches of the largest share, but never more than the smallest share has
    rows (an empty batch would skip DDP's forward on that rank)."""
    return max(1, min(math.ceil(math.ceil(n / world) / batch_size), n // world))


def optimizer_steps(n: int, world: int, batch_size: int, grad_accum: int) -> int:
    """Optimizer steps of an epoch of n rows: one per `grad_accum` batches of a rank."""
    return math.ceil(batches_per_epoch(n, world, batch_size) / grad_accum)


def batch_sizes(rows: int, num_batches: int) -> list[int]:
    base, extra = divmod(rows, num_batches)
    return [base + (1 if i < extra else 0) for i in range(num_batches)]


def group_rows(table, group: RowGroup):
    """The rows the input takes of a row group read whole: a subset's picks, else its first `rows`."""
    if group.picks is not None:
        return table.take(np.frombuffer(group.picks, np.int32))
    return table.slice(0, group.rows)


def _read_span(span: Span) -> list[Sample]:
    f = location(span.group.file)
    pf = pq.ParquetFile(f.path, filesystem=f.fs)
    names = set(pf.schema_arrow.names)
    t = pf.read_row_group(span.group.index, columns=[IMAGE] + ([LABEL] if LABEL in names else []))
    t = group_rows(t, span.group).slice(span.start, span.stop - span.start)
    images = t.column(IMAGE).to_pylist()
    labels = t.column(LABEL).to_pylist() if LABEL in names else [None] * len(images)
    first = span.group.first_id + span.start
    return [(first + i, img, -1 if lbl is None else int(lbl)) for i, (img, lbl) in enumerate(zip(images, labels))]


def read_group(group: RowGroup) -> list[Sample]:
    """Every row the input takes from one row group, (sample id, encoded image, label) in plan order."""
    return _read_span(Span(group, 0, group.rows))


def _prefetched(spans: Sequence[Span]) -> Iterator[list[Sample]]:
    """Row groups read by a background thread, at most PREFETCH_GROUPS ahead (I/O overlaps the step)."""
    q: queue.Queue = queue.Queue(maxsize=PREFETCH_GROUPS)
    stop = threading.Event()

    def reader() -> None:
        try:
            for s in spans:
                rows = _read_span(s)
                while not stop.is_set():
                    try:
                        q.put(rows, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(None)
        except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
            q.put(e)

    t = threading.Thread(target=reader, name="shard-reader", daemon=True)
    t.start()
    try:
        while True:
            item = q.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


def sample_stream(spans: Sequence[Span], *, buffer: int, seed: int, epoch: int, rank: int) -> Iterator[Sample]:
    """The rank's samples for the epoch, through the shuffle buffer (deterministic; docs/design.md, "Streaming
    the training input")."""
    rng = np.random.default_rng(derive_seed(seed, epoch, rank, 0x5B))
    buf: list[Sample] = []
    for rows in _prefetched(spans):
        for row in rows:
            if len(buf) < buffer:
                buf.append(row)
                continue
            if buffer == 0:
                yield row
                continue
            j = int(rng.integers(buffer))
            out, buf[j] = buf[j], row
            yield out
    order = rng.permutation(len(buf))
    for j in order:
        yield buf[int(j)]


class EpochBatches:
    """Batch sampler for the DataLoader: yields batches of *encoded* samples (the training process streams
    and shuffles bytes; loader processes decode). Skips the first `skip` samples (mid-epoch resume)."""

    def __init__(self, groups: Sequence[RowGroup], *, batch_size: int, rank: int, world: int, seed: int,
                 buffer: int, shuffle: bool = True):
        self.groups, self.batch_size, self.rank, self.world = list(groups), batch_size, rank, world
        self.seed, self.buffer, self.shuffle = seed, buffer, shuffle
        self.n = total_rows(self.groups)
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    @property
    def rows(self) -> int:
        return rank_rows(self.n, self.rank, self.world)

    def sizes(self) -> list[int]:
        return batch_sizes(self.rows, batches_per_epoch(self.n, self.world, self.batch_size))

    def __len__(self) -> int:
        return batches_per_epoch(self.n, self.world, self.batch_size)

    def __iter__(self) -> Iterator[list[Sample]]:
        spans = epoch_plan(self.groups, seed=self.seed, epoch=self.epoch, rank=self.rank, world=self.world,
                           shuffle=self.shuffle)
        stream = sample_stream(spans, buffer=self.buffer if self.shuffle else 0, seed=self.seed, epoch=self.epoch,
                               rank=self.rank)
        skip = self.skip
        for size in self.sizes():
            if skip >= size:  # whole batches already trained before the resume
                for _ in range(size):
                    next(stream)
                skip -= size
                continue
            batch = [next(stream) for _ in range(size)]
            if skip:
                batch, skip = batch[skip:], 0
            yield batch
