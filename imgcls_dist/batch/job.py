"""The batch job's inputs checked before any Ray work: input files, ensemble, output directory, as one
`InferJob` the later steps (`batch/resume.py`, `batch/pipeline.py`) read."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import pyarrow.parquet as pq

from imgcls_dist.batch import parts
from imgcls_dist.data.schema import LABEL, list_parquet, validate_files
from imgcls_dist.errors import UserError
from imgcls_dist.storage import Location, location


@dataclass
class InferJob:
    """Everything validated before any Ray work: inputs, ensemble, output directory."""

    files: list[Location]
    layout: list[parts.FileLayout]  # per input file: identity and row groups
    rows_in: int
    with_label: bool
    model_paths: list[str]
    weights: list[float] | None  # as given (the predictor normalizes)
    combine: str
    views: list[str]
    keys: list[tuple[int, int]]  # (image_size, channels) the members need
    members: list[dict[str, Any]]
    classes: list[str]
    norm_weights: list[float]
    temperatures: list[float]
    batch_size: int
    out: Location


def _input_columns(files: list[Location]) -> tuple[bool, bool]:
    """(with_label, label_mixed): label is passed through only when every file has it."""
    has = [LABEL in pq.ParquetFile(f.path, filesystem=f.fs).schema_arrow.names for f in files]
    return all(has), any(has) and not all(has)


def _check_output(out: Location, files: list[Location]) -> None:
    if any(f.parent == out for f in files):
        raise UserError(f"{out}: output directory holds input files; its *.parquet would be replaced")
    if out.is_file():
        raise UserError(f"{out}: exists and is not a directory")
    if len({f.scheme for f in files}) > 1:
        raise UserError(f"--input: all input files must be on one filesystem (got {files[0]} and {files[-1]})")
    out.check_writable()


def validate_job(models, input, output, *, tta, batch_size, weights, combine) -> InferJob:
    from imgcls_dist.predictor.manifest import print_spread_note, resolve_ensemble
    from imgcls_dist.predictor.predictor import EnsemblePredictor

    files = list_parquet(input)
    rows_in = validate_files(files, require_id=True)
    with_label, label_mixed = _input_columns(files)
    if label_mixed:
        print("infer: note: only some input files have a 'label' column; labels are not passed through",
              file=sys.stderr)
    spec = resolve_ensemble(models, weights, combine)
    # Built once on CPU here so a bad file, arch/weights mismatch or class mismatch fails now, not in an actor.
    probe = EnsemblePredictor.from_spec(spec, views=tta, device="cpu", batch_size=batch_size)
    out = location(output)
    _check_output(out, files)
    print_spread_note(spec, probe.describe())
    return InferJob(files, parts.input_layout(files), rows_in, with_label, spec.paths, spec.weights, probe.combine,
                    probe.views, probe.input_keys, probe.describe(), probe.classes, probe.weights, probe.temperatures,
                    batch_size, out)
