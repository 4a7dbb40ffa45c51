"""The shard contract (docs/design.md, "Dataset shards"): which columns, which types, and validation before
any work starts."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable, Sequence, TypeVar

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from imgcls_dist.errors import UserError
from imgcls_dist.storage import Location, PathLike, location

# Footers of files on an object store are read in parallel: each costs a round trip or two.
FOOTER_THREADS = 16
T = TypeVar("T")
R = TypeVar("R")


def map_files(fn: Callable[[T], R], files: Sequence[T]) -> list[R]:
    """`[fn(f) for f in files]`, FOOTER_THREADS at a time: for per-file metadata reads (footers, sizes), which
    on an object store are round trips, not work. Results in the order of `files`; the first error raises."""
    if not files:
        return []
    with ThreadPoolExecutor(min(FOOTER_THREADS, len(files))) as pool:
        return list(pool.map(fn, files))

SPLITS = ("train", "val", "test")
DATASET_FILE = "dataset.json"

ID, IMAGE, LABEL = "id", "image", "label"
SHARD_SCHEMA = pa.schema([(ID, pa.string()), (IMAGE, pa.binary()), (LABEL, pa.int64())])


def _split_glob(s: str) -> tuple[str, str]:
    """'s3://b/data/*/x-*.parquet' -> ('s3://b/data', '*/x-*.parquet'): the base has no wildcard."""
    parts = s.split("/")
    first = next(i for i, part in enumerate(parts) if any(ch in part for ch in "*?["))
    return "/".join(parts[:first]) or ".", "/".join(parts[first:])


def list_parquet(source: PathLike | Iterable[PathLike]) -> list[Location]:
    """A directory (recursively), a glob, a file, or a list of those -> sorted Parquet files, on any filesystem."""
    if not isinstance(source, (str, os.PathLike, Location)):
        return sorted({f for s in source for f in list_parquet(s)}, key=str)
    s = str(source)
    if not isinstance(source, Location) and any(ch in s for ch in "*?["):
        base, pattern = _split_glob(s)
        files = location(base).glob(pattern)
    else:
        loc = location(source)
        if loc.is_dir():
            files = loc.files(".parquet")
        elif loc.is_file():
            files = [loc]
        else:
            loc.check_readable("file or directory")
            files = []
    # Ray Data / our own writers keep temporaries in dot- or underscore-prefixed dirs: never inputs.
    files = [f for f in files if f.suffix == ".parquet"
             and not any(part.startswith(("_", ".")) for part in f.path.split("/")[-2:])]
    if not files:
        raise UserError(f"{s}: no .parquet files found")
    return sorted(files, key=str)


def _is_string(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def _is_binary(t: pa.DataType) -> bool:
    return pa.types.is_binary(t) or pa.types.is_large_binary(t)


def _label_range(f: Location, pf: pq.ParquetFile, labels_col: int) -> tuple[int | None, int | None, int]:
    """(min, max, null count) of the label column from row-group statistics; the column is read only
    when a row group has none."""
    md = pf.metadata
    lo = hi = None
    nulls = 0
    for rg in range(md.num_row_groups):
        st = md.row_group(rg).column(labels_col).statistics
        if st is None or not st.has_null_count or (md.row_group(rg).num_rows > st.null_count and not st.has_min_max):
            col = pf.read(columns=[LABEL]).column(LABEL)
            valid = len(col) - col.null_count
            return ((pc.min(col).as_py(), pc.max(col).as_py(), col.null_count) if valid else (None, None, col.null_count))
        nulls += st.null_count
        if st.has_min_max:
            lo = st.min if lo is None else min(lo, st.min)
            hi = st.max if hi is None else max(hi, st.max)
    return lo, hi, nulls


def _check_file(f: Location, require_id: bool, require_label: bool, num_classes: int | None) -> int:
    try:
        pf = pq.ParquetFile(f.path, filesystem=f.fs)
        schema = pf.schema_arrow
    except UserError:
        raise
    except OSError as e:
        if f.exists():
            raise UserError(f"{f}: not a readable Parquet file ({str(e).splitlines()[0][:160]})") from None
        raise f.error(e) from None
    except Exception as e:  # noqa: BLE001 - any unreadable footer is a bad file for the user
        raise UserError(f"{f}: not a readable Parquet file ({str(e).splitlines()[0][:160]})") from None
    names = set(schema.names)
    needed = [IMAGE] + ([ID] if require_id else []) + ([LABEL] if require_label else [])
    for col in needed:
        if col not in names:
            raise UserError(f"{f}: missing required column {col!r} (has {sorted(names)})")
    if not _is_binary(schema.field(IMAGE).type):
        raise UserError(f"{f}: column 'image' must be binary (encoded image bytes), got {schema.field(IMAGE).type}")
    if ID in names and not _is_string(schema.field(ID).type):
        raise UserError(f"{f}: column 'id' must be string, got {schema.field(ID).type}")
    if LABEL in names:
        lt = schema.field(LABEL).type
        if not pa.types.is_integer(lt) and not pa.types.is_null(lt):
            raise UserError(f"{f}: column 'label' must be an integer class index, got {lt}")
        if num_classes is not None and pf.metadata.num_rows and pa.types.is_integer(lt):
            lo, hi, nulls = _label_range(f, pf, pf.metadata.schema.names.index(LABEL))
            if require_label and nulls:
                raise UserError(f"{f}: column 'label' has {nulls} null values (labels are required here)")
            if lo is not None and (lo < 0 or hi >= num_classes):
                bad = lo if lo < 0 else hi
                raise UserError(f"{f}: label {bad} outside classes [0, {num_classes - 1}]")
    return pf.metadata.num_rows


def validate_files(
    files: Iterable[PathLike],
    *,
    require_id: bool = False,
    require_label: bool = False,
    num_classes: int | None = None,
) -> int:
    """Check every file's schema (and label range) before work starts; returns the total row count.
    The first bad file in the given order is the one reported."""
    locs = [location(f) for f in files]
    return sum(map_files(lambda f: _check_file(f, require_id, require_label, num_classes), locs))


def hflip_allowed(dataset_meta: dict) -> bool:
    """Whether a dataset tolerates horizontal flips (``"hflip"`` in dataset.json; default True)."""
    value = dataset_meta.get("hflip", True)
    if not isinstance(value, bool):
        # a string "false" would otherwise be truthy and silently flip digits
        raise UserError(f"dataset.json hflip: must be true or false, got {value!r}")
    return value


def read_dataset_meta(dataset_dir: PathLike) -> dict[str, Any]:
    d = location(dataset_dir)
    p = d / DATASET_FILE
    if not p.is_file():
        if not d.is_local:
            d.check_readable("dataset directory")
        raise UserError(f"{d}: not a dataset directory (missing {DATASET_FILE}; create one with `imgcls-dist ingest`)")
    meta = p.read_json()
    classes = meta.get("classes") if isinstance(meta, dict) else None
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        raise UserError(f"{p}: 'classes' must be a non-empty list of class names")
    return meta


def split_files(dataset_dir: PathLike, split: str) -> list[Location]:
    d = location(dataset_dir) / split
    files = d.files(".parquet", recursive=False)
    if not files:
        if not d.is_dir():
            raise UserError(f"{location(dataset_dir)}: missing split directory {split}/")
        raise UserError(f"{d}: no .parquet files in split {split!r}")
    return files


def validate_dataset(dataset_dir: PathLike, splits: Iterable[str] = SPLITS) -> dict[str, Any]:
    """Validate a dataset directory; returns its metadata plus {split: [files]} under 'files' and
    {split: row count} under 'rows'."""
    meta = read_dataset_meta(dataset_dir)
    files, rows = {}, {}
    for split in splits:
        files[split] = split_files(dataset_dir, split)
        rows[split] = validate_files(files[split], require_label=True, num_classes=len(meta["classes"]))
    return {**meta, "files": files, "rows": rows}
