"""Staged parts: the unit of durable progress of a batch-inference job, and the Ray Data read/write ends that
make them.

A part is a Parquet file whose footer records which input rows it holds, as ranges of (input file, row)
positions. `plan_units` and `ShardRows` read the rows still to predict with their positions, `PartsDatasink`
writes the parts, `read_parts` reads them back from their footers alone. Design: docs/design.md, "Staged parts".
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from ray.data import Datasource
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasink, ReadTask

from imgcls_dist.data.schema import ID, map_files
from imgcls_dist.batch import publish
from imgcls_dist.batch.stages import DevicePredictActor, PredictActor, decode_batch
from imgcls_dist.preemption import stop_requested
from imgcls_dist.storage import Location, location

POS_FILE, POS_ROW = "_pos_file", "_pos_row"
POSITION_FIELDS = [pa.field(POS_FILE, pa.int32()), pa.field(POS_ROW, pa.int64())]
RANGES_KEY = b"imgcls_dist.rows"  # footer metadata: JSON [[file index, first row, end row), ...]

# Parts: about a 64th of the job each, so a crash loses a few 64ths at most; never fewer rows than
# MIN_PART_ROWS (each part costs a footer read at resume) nor many more than MAX_PART_ROWS (a part is buffered
# whole in its write task: 20k rows of 1000-class probabilities are ~80 MB).
PARTS_PER_JOB = 64
MIN_PART_ROWS = 256
MAX_PART_ROWS = 20_000
# Read tasks (work units): consecutive row groups of one file, at most a part's rows (at least one row group)
# and UNIT_BYTES of encoded images. Ray Data coalesces what a task yields into one block, and the write
# bundles blocks until it has a part's rows, so this bound is also what keeps a part near rows_per_part.
UNIT_BYTES = 256 << 20

Range = tuple[int, int, int]  # (input file index, first row, end row), end exclusive


def rows_per_part(rows_in: int) -> int:
    return min(MAX_PART_ROWS, max(MIN_PART_ROWS, math.ceil(rows_in / PARTS_PER_JOB)))


# ---------------------------------------------------------------- ranges


def to_ranges(files: np.ndarray, rows: np.ndarray) -> tuple[list[Range], np.ndarray]:
    """Positions -> (sorted maximal runs, the order that sorts the rows). A position seen twice breaks the
    run and shows up as overlapping ranges, which the publish check refuses."""
    order = np.lexsort((rows, files))
    f, r = files[order], rows[order]
    if not len(r):
        return [], order
    breaks = np.flatnonzero((np.diff(f) != 0) | (np.diff(r) != 1)) + 1
    starts, ends = np.r_[0, breaks], np.r_[breaks, len(r)]
    return [(int(f[s]), int(r[s]), int(r[e - 1]) + 1) for s, e in zip(starts, ends)], order


def _digest(ranges: list[Range]) -> str:
    return hashlib.sha1(json.dumps(ranges).encode()).hexdigest()[:16]


def part_name(run_id: str, ranges: list[Range]) -> str:
    return f"{run_id}_{_digest(ranges)}.parquet"


def writer_of(loc: Location) -> str:
    """The run id a part's name says wrote it ('' for files that are not parts)."""
    stem = loc.stem
    return stem.rsplit("_", 1)[0] if "_" in stem else ""


# ---------------------------------------------------------------- parts on storage


@dataclass(frozen=True)
class Part:
    loc: Location
    rows: int
    error_rows: int
    ranges: tuple[Range, ...]

    @property
    def writer(self) -> str:
        return writer_of(self.loc)


def read_part(loc: Location) -> Part | None:
    """A staged part from its footer alone; None for a file that is not one of ours (no ranges recorded,
    or ranges that do not add up to its rows)."""
    try:
        pf = pq.ParquetFile(loc.path, filesystem=loc.fs)
        raw = (pf.metadata.metadata or {}).get(RANGES_KEY)
        if raw is None:
            return None
        ranges = tuple((int(f), int(s), int(e)) for f, s, e in json.loads(raw))
        rows, errors = publish.footer_counts(pf)
    # vanished meanwhile, not a whole part, or ranges of the wrong shape (a footer we did not write): no progress
    except (OSError, pa.ArrowException, ValueError, TypeError, OverflowError, RecursionError):
        return None
    if sum(e - s for _, s, e in ranges) != rows:
        return None
    return Part(loc, rows, errors, ranges)


def read_parts(locs: list[Location]) -> list[Part]:
    return [p for p in map_files(read_part, locs) if p is not None]


def staged_parts(staging: Location) -> list[Location]:
    return [f for f in staging.files(".parquet", recursive=False) if writer_of(f)]


# ---------------------------------------------------------------- the input, as work units


@dataclass(frozen=True)
class FileLayout:
    """One input file as the job sees it: identity (for the resume fingerprint) and row groups."""

    uri: str
    bytes: int
    mtime_ns: int | None
    group_rows: tuple[int, ...]
    group_bytes: tuple[int, ...]

    @property
    def rows(self) -> int:
        return sum(self.group_rows)


def _layout(f: Location) -> FileLayout:
    md = pq.ParquetFile(f.path, filesystem=f.fs).metadata
    groups = [md.row_group(i) for i in range(md.num_row_groups)]
    return FileLayout(f.uri, f.size(), f.mtime_ns(), tuple(g.num_rows for g in groups),
                      tuple(g.total_byte_size for g in groups))


def input_layout(files: list[Location]) -> list[FileLayout]:
    return map_files(_layout, files)


@dataclass(frozen=True)
class Unit:
    """One read task: row groups [first, last] of input file `file` (whose first row is row `offset` of the
    file), of which only the `wanted` row ranges are read on (a resumed run's: those no adopted part holds)."""

    file: int
    first: int
    last: int
    offset: int
    wanted: tuple[tuple[int, int], ...]
    rows: int
    bytes: int


def _groups_wanted(fl: FileLayout, ranges: list[tuple[int, int]]) -> Iterator[tuple[int, int, list[tuple[int, int]]]]:
    """(row group, its first row, the wanted ranges inside it) for each row group holding wanted rows; one
    pass over both sorted lists, so a 10^7-row file with thousands of gaps plans in milliseconds."""
    k, start = 0, 0
    for g, n in enumerate(fl.group_rows):
        end = start + n
        while k < len(ranges) and ranges[k][1] <= start:
            k += 1
        wanted, j = [], k
        while j < len(ranges) and ranges[j][0] < end:
            wanted.append((max(start, ranges[j][0]), min(end, ranges[j][1])))
            j += 1
        if wanted:
            yield g, start, wanted
        start = end


def plan_units(layout: list[FileLayout], todo: dict[int, list[tuple[int, int]]], max_rows: int) -> list[Unit]:
    """Row groups holding any row still to predict (todo: sorted ranges per file), cut into read tasks of
    consecutive row groups with at most `max_rows` wanted rows and UNIT_BYTES (or one row group); row
    groups without wanted rows are not read."""
    units = []
    for i, fl in enumerate(layout):
        cur: list[tuple[int, int, list[tuple[int, int]]]] = []
        rows = nbytes = 0
        for g, start, wanted in _groups_wanted(fl, todo.get(i, [])):
            n = sum(e - s for s, e in wanted)
            if cur and (cur[-1][0] != g - 1 or rows + n > max_rows or nbytes + fl.group_bytes[g] > UNIT_BYTES):
                units.append(_unit(i, cur, rows, nbytes))
                cur, rows, nbytes = [], 0, 0
            cur.append((g, start, wanted))
            rows, nbytes = rows + n, nbytes + fl.group_bytes[g]
        if cur:
            units.append(_unit(i, cur, rows, nbytes))
    return units


def _unit(file: int, groups: list[tuple[int, int, list[tuple[int, int]]]], rows: int, nbytes: int) -> Unit:
    wanted = tuple(r for _, _, w in groups for r in w)
    return Unit(file, groups[0][0], groups[-1][0], groups[0][1], wanted, rows, nbytes)


# ---------------------------------------------------------------- read stage


def _in_ranges(rows: np.ndarray, ranges: tuple[tuple[int, int], ...]) -> np.ndarray:
    mask = np.zeros(len(rows), bool)
    for s, e in ranges:
        mask |= (rows >= s) & (rows < e)
    return mask


def read_unit(uri: str, unit: Unit, columns: list[str], stop_flag=None) -> Iterator[pa.Table]:
    """The wanted rows of a unit, one block per row group, with their position columns; nothing once the job
    was asked to stop (preemption.py)."""
    if stop_requested(stop_flag):
        return
    f = location(uri)
    pf = pq.ParquetFile(f.path, filesystem=f.fs)
    start = unit.offset
    for g in range(unit.first, unit.last + 1):
        t = pf.read_row_group(g, columns=columns)
        rows = np.arange(start, start + t.num_rows, dtype=np.int64)
        start += t.num_rows
        keep = _in_ranges(rows, unit.wanted)
        if not keep.any():
            continue
        if not keep.all():
            t, rows = t.filter(pa.array(keep)), rows[keep]
        t = t.append_column(POSITION_FIELDS[0], pa.array(np.full(len(rows), unit.file, np.int32)))
        yield t.append_column(POSITION_FIELDS[1], pa.array(rows))


class ShardRows(Datasource):
    """Ray Data source over the units of a job: Ray's own Parquet reader cannot say where a row came from,
    nor read only some rows of a row group range, and both are what a resumed run needs."""

    def __init__(self, layout: list[FileLayout], units: list[Unit], columns: list[str], stop_flag=None):
        self._uris = [fl.uri for fl in layout]
        self._units, self._columns, self._stop_flag = units, columns, stop_flag

    def get_name(self) -> str:
        return "ShardRows"

    def estimate_inmemory_data_size(self) -> int | None:
        return sum(u.bytes for u in self._units)

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context=None) -> list[ReadTask]:
        # One task per unit whatever `parallelism` asks: the units already bound a task's memory.
        tasks = []
        for u in self._units:
            uri, cols, flag = self._uris[u.file], self._columns, self._stop_flag
            meta = BlockMetadata(num_rows=u.rows, size_bytes=u.bytes, input_files=[uri], exec_stats=None)
            tasks.append(ReadTask(lambda uri=uri, u=u, cols=cols, flag=flag: read_unit(uri, u, cols, flag), meta))
        return tasks


# ---------------------------------------------------------------- decode and predict, positions kept


def _with_positions(src: pa.Table, out: pa.Table) -> pa.Table:
    # The stages keep row order (and the decode stage the row count); checked, because a stage that reordered
    # rows would silently attach predictions to the wrong input rows.
    if not out.column(ID).equals(src.column(ID)):
        raise RuntimeError("an inference stage reordered rows; positions would no longer match")
    for field in POSITION_FIELDS:
        out = out.append_column(field, src.column(field.name))
    return out


def decode_positioned(batch: pa.Table, keys, with_label: bool) -> pa.Table:
    return _with_positions(batch, decode_batch(batch, keys=keys, with_label=with_label))


class _Positioned:
    """Actor UDF mix-in: predictions keep their rows' positions; once the job was asked to stop, batches pass
    through unpredicted (no rows: they stay unwritten, the next run predicts them), so the rows already
    predicted reach the write stage within the grace, however many rows the read stage had queued."""

    def __init__(self, *args, stop_flag=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._stop_flag, self._stopped = stop_flag, False

    def __call__(self, batch: pa.Table) -> pa.Table:
        self._stopped = self._stopped or stop_requested(self._stop_flag) is not None
        if self._stopped:
            return pa.schema(list(self.schema) + POSITION_FIELDS).empty_table()
        return _with_positions(batch, super().__call__(batch))


class PositionedPredictActor(_Positioned, PredictActor):
    pass


class PositionedDevicePredictActor(_Positioned, DevicePredictActor):
    pass


# ---------------------------------------------------------------- write stage


def encode_part(table: pa.Table) -> tuple[list[Range], pa.Buffer]:
    """Prediction rows with positions -> (their ranges, Parquet bytes of the rows in input order, without
    the position columns, with the ranges in the footer)."""
    files = table.column(POS_FILE).to_numpy()
    rows = table.column(POS_ROW).to_numpy()
    ranges, order = to_ranges(files, rows)
    out = table.take(pa.array(order)).drop_columns([POS_FILE, POS_ROW])
    out = out.replace_schema_metadata({**(out.schema.metadata or {}), RANGES_KEY: json.dumps(ranges).encode()})
    sink = pa.BufferOutputStream()
    pq.write_table(out, sink)
    return ranges, sink.getvalue()


class PartsDatasink(Datasink):
    """Each write task writes one part (>= rows_per_part rows but the last) into the staging directory."""

    def __init__(self, staging: Location, run_id: str, rows_per_part: int):
        self.staging, self.run_id, self._rows = staging, run_id, rows_per_part

    @property
    def min_rows_per_write(self) -> int:
        return self._rows

    def get_name(self) -> str:
        return "WriteParts"

    def write(self, blocks: Iterable[pa.Table], ctx) -> list[str]:
        tables = [b for b in blocks if b.num_rows]
        if not tables:
            return []
        ranges, data = encode_part(pa.concat_tables(tables))
        name = part_name(self.run_id, ranges)
        (self.staging / name).write_bytes(memoryview(data))
        return [name]
