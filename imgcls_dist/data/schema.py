"""The shard contract of design.md: which columns, which types, and validation before any work starts."""

from __future__ import annotations

import glob
import json
from pathlib import Path
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from imgcls_dist.errors import UserError

SPLITS = ("train", "val", "test")
DATASET_FILE = "dataset.json"

ID, IMAGE, LABEL = "id", "image", "label"
SHARD_SCHEMA = pa.schema([(ID, pa.string()), (IMAGE, pa.binary()), (LABEL, pa.int64())])


def list_parquet(source: str | Path | Iterable[str | Path]) -> list[Path]:
    """A directory (recursively), a glob, a file, or a list of those -> sorted Parquet files."""
    if not isinstance(source, (str, Path)):
        return sorted({f for s in source for f in list_parquet(s)})
    s = str(source)
    p = Path(s)
    if any(ch in s for ch in "*?["):
        files = [Path(f) for f in glob.glob(s, recursive=True)]
    elif p.is_dir():
        files = list(p.rglob("*.parquet"))
    elif p.is_file():
        files = [p]
    else:
        raise UserError(f"{s}: no such file or directory")
    # Ray Data / our own writers keep temporaries in dot- or underscore-prefixed dirs: never inputs.
    files = [f for f in files if f.suffix == ".parquet" and not any(part.startswith(("_", ".")) for part in f.parts[-2:])]
    if not files:
        raise UserError(f"{s}: no .parquet files found")
    return sorted(files)


def _is_string(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def _is_binary(t: pa.DataType) -> bool:
    return pa.types.is_binary(t) or pa.types.is_large_binary(t)


def validate_files(
    files: list[Path],
    *,
    require_id: bool = False,
    require_label: bool = False,
    num_classes: int | None = None,
) -> int:
    """Check every file's schema (and label range) before work starts; returns the total row count."""
    total = 0
    for f in files:
        try:
            meta = pq.read_metadata(f)
            schema = pq.read_schema(f)
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
            if num_classes is not None and meta.num_rows:
                labels = pq.read_table(f, columns=[LABEL]).column(LABEL)
                if require_label and labels.null_count:
                    raise UserError(f"{f}: column 'label' has {labels.null_count} null values (labels are required here)")
                if len(labels) - labels.null_count:
                    lo, hi = pc.min(labels).as_py(), pc.max(labels).as_py()
                    if lo < 0 or hi >= num_classes:
                        bad = lo if lo < 0 else hi
                        raise UserError(f"{f}: label {bad} outside classes [0, {num_classes - 1}]")
        total += meta.num_rows
    return total


def read_dataset_meta(dataset_dir: str | Path) -> dict[str, Any]:
    p = Path(dataset_dir) / DATASET_FILE
    if not p.is_file():
        raise UserError(f"{dataset_dir}: not a dataset directory (missing {DATASET_FILE}; create one with `imgcls-dist ingest`)")
    try:
        meta = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{p}: invalid JSON ({e.msg} at line {e.lineno})") from None
    classes = meta.get("classes") if isinstance(meta, dict) else None
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        raise UserError(f"{p}: 'classes' must be a non-empty list of class names")
    return meta


def split_files(dataset_dir: str | Path, split: str) -> list[Path]:
    d = Path(dataset_dir) / split
    if not d.is_dir():
        raise UserError(f"{dataset_dir}: missing split directory {split}/")
    files = sorted(d.glob("*.parquet"))
    if not files:
        raise UserError(f"{d}: no .parquet files in split {split!r}")
    return files


def validate_dataset(dataset_dir: str | Path, splits: Iterable[str] = SPLITS) -> dict[str, Any]:
    """Validate a dataset directory; returns its metadata plus {split: [files]} under 'files'."""
    meta = read_dataset_meta(dataset_dir)
    files = {}
    for split in splits:
        files[split] = split_files(dataset_dir, split)
        validate_files(files[split], require_label=True, num_classes=len(meta["classes"]))
    return {**meta, "files": files}
