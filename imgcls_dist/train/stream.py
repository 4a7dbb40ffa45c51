"""Streaming, sharded training input: each worker reads only its share of the row groups, in constant memory.

`list_row_groups` plans from the footers; `epoch_plan` gives each rank a contiguous share of the epoch's
permuted row sequence (every sample exactly once, equal batch counts on every rank); `EpochBatches`, the
DataLoader's batch sampler, streams it through a seeded shuffle buffer and can start mid-epoch on resume, on
the same number of workers or, re-cutting the rest of the epoch (`EpochProgress`), on another.
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


@dataclass(frozen=True)
class EpochProgress:
    """How far an epoch got, in the terms of the world it began on: samples consumed so far from each of that
    world's rank streams (`epoch_plan` + `sample_stream` of each rank). Any world can continue from it."""

    world: int
    consumed: tuple[int, ...]
    recut: bool = False  # taken after a re-cut: the ranks' batches are no longer the epoch's own

    def to_state(self) -> dict:
        return {"world": self.world, "consumed": list(self.consumed), "recut": self.recut}

    @classmethod
    def from_state(cls, state: dict) -> EpochProgress:
        return cls(int(state["world"]), tuple(int(c) for c in state["consumed"]), bool(state["recut"]))


def rest_slices(n: int, progress: EpochProgress, rank: int, world: int) -> list[tuple[int, int, int]]:
    """The rest of an epoch re-cut over `world` ranks: what is left of each old rank's stream, laid end to end
    in old-rank order, split into `world` contiguous shares. This rank's share as (old rank, first, end)
    positions in that old rank's stream."""
    left = [rank_rows(n, k, progress.world) - c for k, c in enumerate(progress.consumed)]
    total = sum(left)
    lo, hi = rank * total // world, (rank + 1) * total // world
    out, offset = [], 0
    for k, (c, m) in enumerate(zip(progress.consumed, left)):
        a, b = max(lo, offset), min(hi, offset + m)
        if a < b:
            out.append((k, c + a - offset, c + b - offset))
        offset += m
    return out


class EpochBatches:
    """Batch sampler for the DataLoader: yields batches of *encoded* samples (the training process streams
    and shuffles bytes; loader processes decode). Skips the first `skip` samples (mid-epoch resume)."""

    def __init__(self, groups: Sequence[RowGroup], *, batch_size: int, rank: int, world: int, seed: int,
                 buffer: int, shuffle: bool = True):
        self.groups, self.batch_size, self.rank, self.world = list(groups), batch_size, rank, world
        self.seed, self.buffer, self.shuffle = seed, buffer, shuffle
        self.n = total_rows(self.groups)
        self.epoch, self.skip = 0, 0
        self.rest: EpochProgress | None = None

    def set_epoch(self, epoch: int, skip: int = 0, rest: EpochProgress | None = None) -> None:
        """`skip`: samples of this rank's share already trained; `rest`: train only what that progress left
        of the epoch, re-cut over this world (elastic resume; `skip` then counts in the re-cut share)."""
        self.epoch, self.skip, self.rest = epoch, skip, rest

    def _rows_of(self, rank: int) -> int:
        if self.rest is None:
            return rank_rows(self.n, rank, self.world)
        return sum(b - a for _, a, b in rest_slices(self.n, self.rest, rank, self.world))

    @property
    def rows(self) -> int:
        return self._rows_of(self.rank)

    def __len__(self) -> int:
        n = self.n if self.rest is None else sum(self._rows_of(r) for r in range(self.world))
        return batches_per_epoch(n, self.world, self.batch_size)

    def sizes(self, rank: int | None = None) -> list[int]:
        return batch_sizes(self._rows_of(self.rank if rank is None else rank), len(self))

    def progress(self, batches: int) -> EpochProgress:
        """The epoch's progress once every rank has trained its first `batches` batches."""
        if self.rest is None:
            return EpochProgress(self.world, tuple(sum(self.sizes(r)[:batches]) for r in range(self.world)))
        consumed = list(self.rest.consumed)
        for r in range(self.world):
            left = sum(self.sizes(r)[:batches])
            for k, a, b in rest_slices(self.n, self.rest, r, self.world):
                took = min(left, b - a)
                consumed[k] += took
                left -= took
        return EpochProgress(self.rest.world, tuple(consumed), recut=True)

    def _stream(self, rank: int, world: int) -> Iterator[Sample]:
        spans = epoch_plan(self.groups, seed=self.seed, epoch=self.epoch, rank=rank, world=world, shuffle=self.shuffle)
        return sample_stream(spans, buffer=self.buffer if self.shuffle else 0, seed=self.seed, epoch=self.epoch,
                             rank=rank)

    def _rest_stream(self) -> Iterator[Sample]:
        """This rank's share of the re-cut rest: pieces of the old ranks' own streams (each regenerated, its
        consumed samples passed over), so every sample left is trained once, by one rank."""
        for k, a, b in rest_slices(self.n, self.rest, self.rank, self.world):
            stream = self._stream(k, self.rest.world)
            for _ in range(a):
                next(stream)
            for _ in range(b - a):
                yield next(stream)

    def __iter__(self) -> Iterator[list[Sample]]:
        stream = self._stream(self.rank, self.world) if self.rest is None else self._rest_stream()
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
