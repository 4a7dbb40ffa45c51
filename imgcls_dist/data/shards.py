"""Writing and reading Parquet image shards (encoded bytes, never decoded arrays)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from imgcls_dist.data.schema import ID, IMAGE, LABEL, SHARD_SCHEMA
from imgcls_dist.storage import Location, PathLike, location


# A row group per this many rows (or bytes, whichever comes first): a reader streams a shard row group by
# row group (train/stream.py reads ahead two of them), and a writer holds at most one in memory.
ROW_GROUP_ROWS = 128
ROW_GROUP_BYTES = 32 << 20


class ShardWriter:
    """One shard (any filesystem), written row group by row group."""

    def __init__(self, dest: PathLike):
        self.dest = location(dest)
        self._sink = self.dest.open_output()
        self._writer = pq.ParquetWriter(self._sink, SHARD_SCHEMA)
        self._buf: list[tuple[str, bytes, int | None]] = []
        self._bytes = 0
        self.rows = 0

    def add(self, row_id: str, image: bytes, label: int | None) -> None:
        self._buf.append((row_id, image, label))
        self._bytes += len(image)
        self.rows += 1
        if len(self._buf) >= ROW_GROUP_ROWS or self._bytes >= ROW_GROUP_BYTES:
            self._flush()

    def _flush(self) -> None:
        if self._buf:
            ids, images, labels = zip(*self._buf)
            self._writer.write_table(pa.table({ID: pa.array(ids, pa.string()), IMAGE: pa.array(images, pa.binary()),
                                               LABEL: pa.array(labels, pa.int64())}, schema=SHARD_SCHEMA))
            self._buf.clear()
            self._bytes = 0

    def close(self) -> Location:
        self._flush()
        self._writer.close()
        self._sink.close()
        return self.dest

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_shards(
    rows: Iterable[tuple[str, bytes, int | None]],
    out_dir: PathLike,
    rows_per_shard: int = 1000,
    prefix: str = "part",
) -> list[Location]:
    """Write (id, image bytes, label) rows as numbered Parquet files of at most rows_per_shard rows."""
    out = location(out_dir).mkdir()
    written: list[Location] = []
    writer: ShardWriter | None = None
    for row in rows:
        if writer is None:
            writer = ShardWriter(out / f"{prefix}-{len(written):05d}.parquet")
        writer.add(*row)
        if writer.rows >= rows_per_shard:
            written.append(writer.close())
            writer = None
    if writer is not None:
        written.append(writer.close())
    if not written:  # an empty split still gets one (empty) shard so the layout is complete
        written.append(ShardWriter(out / f"{prefix}-00000.parquet").close())
    return written


@dataclass
class ShardRows:
    """Rows held as encoded bytes: ~1 KB per digit PNG, so a training split fits in each worker's memory."""

    ids: list[str]
    images: list[bytes]
    labels: np.ndarray  # int64; -1 where the label is null

    def __len__(self) -> int:
        return len(self.images)


def read_rows(files: Iterable[PathLike], limit: int | None = None, with_labels: bool = True) -> ShardRows:
    ids: list[str] = []
    images: list[bytes] = []
    labels: list[int] = []
    for f in map(location, files):
        pf = pq.ParquetFile(f.path, filesystem=f.fs)
        names = set(pf.schema_arrow.names)
        cols = [IMAGE] + [c for c in (ID, LABEL) if c in names]
        t = pf.read(columns=cols)
        n = t.num_rows
        images.extend(t.column(IMAGE).to_pylist())
        ids.extend(t.column(ID).to_pylist() if ID in names else [f"{f.stem}:{i}" for i in range(n)])
        if with_labels and LABEL in names:
            labels.extend(-1 if v is None else v for v in t.column(LABEL).to_pylist())
        else:
            labels.extend([-1] * n)
        if limit is not None and len(images) >= limit:
            break
    if limit is not None:
        ids, images, labels = ids[:limit], images[:limit], labels[:limit]
    return ShardRows(ids=ids, images=images, labels=np.asarray(labels, dtype=np.int64))
