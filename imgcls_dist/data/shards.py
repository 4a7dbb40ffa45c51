"""Writing and reading Parquet image shards (encoded bytes, never decoded arrays)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from imgcls_dist.data.schema import ID, IMAGE, LABEL, SHARD_SCHEMA
from imgcls_dist.storage import Location, PathLike, location


def write_shards(
    rows: Iterable[tuple[str, bytes, int | None]],
    out_dir: PathLike,
    rows_per_shard: int = 1000,
    prefix: str = "part",
) -> list[Location]:
    """Write (id, image bytes, label) rows as numbered Parquet files of at most rows_per_shard rows."""
    out = location(out_dir).mkdir()
    written: list[Location] = []
    buf: list[tuple[str, bytes, int | None]] = []

    def flush() -> None:
        ids, images, labels = zip(*buf) if buf else ((), (), ())
        table = pa.table(
            {ID: pa.array(ids, pa.string()), IMAGE: pa.array(images, pa.binary()), LABEL: pa.array(labels, pa.int64())},
            schema=SHARD_SCHEMA,
        )
        path = out / f"{prefix}-{len(written):05d}.parquet"
        pq.write_table(table, path.path, filesystem=path.fs)
        written.append(path)
        buf.clear()

    for row in rows:
        buf.append(row)
        if len(buf) >= rows_per_shard:
            flush()
    if buf or not written:
        flush()  # an empty split still gets one (empty) shard so the layout is complete
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
