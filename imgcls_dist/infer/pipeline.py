"""Batch inference with Ray Data: Parquet shards in, design.md predictions out, every row accounted for.

Stages: read_parquet (only id/image/label) -> decode+resize in CPU tasks (a row that cannot be decoded
gets zeros and an `error` string; nothing is raised per row) -> ensembled TTA on a fixed actor pool (GPU
when the cluster has one) -> write_parquet. Nothing is materialized in the driver: memory depends on
block and batch sizes, not on the number of input rows.

Actor-pool sizing (see `plan_actors`): Ray Data needs CPUs for read/decode and write tasks while the pool
holds its own; a pool that takes every CPU hangs forever, silently (seen on 2 CPUs: 2 one-CPU actors +
read tasks). So a quarter of the CPUs (at least 1) is kept for 0.5-CPU tasks and the pool shares the
rest: on 2 CPUs, 1 actor x 1 CPU beside two 0.5-CPU decode tasks; on 16, 12 actors and 4 CPUs of tasks.

Output protocol (OUT is owned by this job; one run per OUT at a time, enforced by flock on OUT/.lock):
  1. Validate inputs and models, take the lock, remove stale `.staging-*` dirs of crashed runs.
  2. Ray Data writes into OUT/.staging-<run_id>/ — dot-prefixed, so `list_parquet`, Ray Data and
     pyarrow dataset discovery ignore it; a crash here leaves the previous complete output untouched.
  3. Count rows from the staged files' Parquet footers; rows out != rows in is JobFailed (staging kept).
  4. Publish: delete OUT/_manifest.json, delete every top-level OUT/*.parquet, move the staged files in
     as part-<run_id>-NNNNN.parquet (os.replace), remove the staging dir.
  5. Write OUT/_manifest.json last (tmp + os.replace). It lists the files and their row counts.
A directory without `_manifest.json` is incomplete by definition (evaluate refuses it); a crash during
step 4 leaves no manifest, and the next run into OUT cleans up and republishes. Reruns replace rather
than append, so rows are never duplicated.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import sys
import time
import uuid
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from imgcls_dist.data.schema import ID, IMAGE, LABEL, list_parquet, validate_files
from imgcls_dist.errors import JobFailed, UserError, root_cause

if TYPE_CHECKING:  # torch stays out of the module: decode tasks import it and never need torch
    from imgcls_dist.infer.predictor import InputKey

MANIFEST = "_manifest.json"
LOCK = ".lock"
STAGING_PREFIX = ".staging-"
ERROR = "error"
# Output files of at least this many rows (Ray writes one file per block otherwise: one per batch).
ROWS_PER_FILE = 20_000

OUTPUT_FIELDS = [
    pa.field(ID, pa.string()),
    pa.field("pred", pa.int32()),
    pa.field("pred_name", pa.string()),
    pa.field("confidence", pa.float32()),
    pa.field("probs", pa.list_(pa.float32())),
    pa.field("entropy", pa.float32()),
    pa.field(LABEL, pa.int64()),
    pa.field(ERROR, pa.string()),
]


def output_schema(with_label: bool) -> pa.Schema:
    """design.md's predictions schema; `label` only when the input has it. On error rows pred,
    pred_name, confidence, probs and entropy are all null (not NaN), and `error` says why."""
    return pa.schema([f for f in OUTPUT_FIELDS if with_label or f.name != LABEL])


# ---------------------------------------------------------------- actor-pool sizing


@dataclass(frozen=True)
class ActorPlan:
    num_actors: int
    cpus_per_actor: float
    gpus_per_actor: float
    task_cpus: float  # num_cpus of each read/decode and write task
    torch_threads: int


def plan_actors(available_cpus: float, gpus: float, requested: int | None = None) -> ActorPlan:
    """Size the predictor pool so read/decode/write tasks always have CPUs left beside it.

    A quarter of the CPUs, at least 1 (half of them below 2), is kept out of the pool for tasks:
    decoding + resizing a digit PNG costs ~0.35 ms on one core vs ~2.6 ms for the lenet5 forward over
    the 6 default views (measured on the 2-CPU CI box), and the ratio is far smaller for bigger models,
    so a quarter keeps decode off the critical path. Tasks ask for 0.5 CPU: two run per reserved core,
    and because their resource shape then differs from the actors', Ray Data does not fuse decoding
    into the predictor actors (it fuses map stages with identical remote args), which would serialize
    decode and forward in one process.
    """
    if requested is not None and requested < 1:
        raise UserError(f"--actors: must be >= 1, got {requested}")
    avail = max(float(available_cpus), 0.0)
    if avail <= 0:
        raise JobFailed("the Ray cluster reports no available CPUs; cannot schedule read/decode tasks")
    reserve = max(1.0, math.floor(avail / 4)) if avail >= 2 else avail / 2
    task_cpus = min(0.5, reserve / 2)
    budget = avail - reserve
    if gpus >= 1 or (gpus > 0 and requested):
        n = requested or int(gpus)
        gpus_per_actor = min(1.0, gpus / n)
        cpus_per_actor = min(1.0, budget / n)
    else:
        n = requested or max(1, int(budget))
        gpus_per_actor = 0.0
        cpus_per_actor = budget / n
    # Round down so n * cpus never exceeds the budget through float noise.
    cpus_per_actor = math.floor(cpus_per_actor * 100) / 100
    if cpus_per_actor <= 0:
        raise UserError(f"--actors {n}: too many actors for {avail:g} available CPUs")
    return ActorPlan(n, cpus_per_actor, gpus_per_actor, task_cpus, max(1, int(cpus_per_actor)))


# ---------------------------------------------------------------- Ray Data stages


def _px_column(key: InputKey) -> str:
    return f"_px_{key[0]}x{key[1]}"


def _to_fixed_binary(arr: np.ndarray) -> pa.Array:
    # One fixed-size binary value per row: a zero-copy view of the uint8 pixels, no extension types.
    arr = np.ascontiguousarray(arr)
    row_bytes = int(np.prod(arr.shape[1:]))
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(row_bytes), len(arr), [None, pa.py_buffer(arr)])


def _from_fixed_binary(col: pa.ChunkedArray | pa.Array, key: InputKey) -> np.ndarray:
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    size, channels = key
    row_bytes = size * size * channels
    flat = np.frombuffer(arr.buffers()[1], np.uint8, count=len(arr) * row_bytes, offset=arr.offset * row_bytes)
    return flat.reshape(len(arr), size, size, channels)


def decode_batch(batch: pa.Table, keys: list[InputKey], with_label: bool) -> pa.Table:
    """id/image[/label] -> id, error[, label], one pixel column per member input key."""
    from imgcls_dist.infer.prepare import prepare_encoded  # here: the predictor actors never need albumentations

    arrays, errors = prepare_encoded(batch.column(IMAGE).to_pylist(), keys)
    cols: dict[str, Any] = {ID: batch.column(ID), ERROR: pa.array(errors, pa.string())}
    if with_label:
        cols[LABEL] = batch.column(LABEL).cast(pa.int64())
    for key, arr in arrays.items():
        cols[_px_column(key)] = _to_fixed_binary(arr)
    return pa.table(cols)


class PredictActor:
    """Ray Data actor UDF: loads the ensemble once per actor, predicts the rows that decoded."""

    def __init__(self, model_paths, views, weights, combine, batch_size, torch_threads, with_label):
        import torch

        from imgcls_dist.infer.predictor import EnsemblePredictor

        torch.set_num_threads(torch_threads)
        self.predictor = EnsemblePredictor(model_paths, views=views, weights=weights, combine=combine,
                                           batch_size=batch_size)
        self.with_label = with_label
        self.schema = output_schema(with_label)

    def __call__(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        ok = batch.column(ERROR).is_null().to_numpy(zero_copy_only=False)
        idx = np.flatnonzero(ok)
        num_classes = len(self.predictor.classes)
        probs = np.zeros((n, num_classes), np.float32)
        if len(idx):
            images = {k: _from_fixed_binary(batch.column(_px_column(k)), k)[idx] for k in self.predictor.input_keys}
            probs[idx] = self.predictor.predict_uint8(images)
        return predictions_table(batch, probs, ok, self.predictor.classes, self.schema)


def predictions_table(batch: pa.Table, probs: np.ndarray, ok: np.ndarray, classes: list[str],
                      schema: pa.Schema) -> pa.Table:
    """Rows of `batch` + ensembled probabilities -> the output schema (nulls where not ok)."""
    null = pa.array(~ok)
    pred = probs.argmax(axis=1).astype(np.int32)
    conf = probs.max(axis=1).astype(np.float32)
    p = np.clip(probs, 1e-12, 1.0)
    entropy = -(probs * np.log(p)).sum(axis=1).astype(np.float32)  # nats
    num_classes = probs.shape[1]
    lengths = np.where(ok, num_classes, 0)
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    values = pa.array(probs[ok].reshape(-1), pa.float32())
    names = np.asarray(classes, dtype=object)[pred]
    cols = {
        ID: batch.column(ID),
        "pred": pa.array(pred, pa.int32(), mask=~ok),
        "pred_name": pa.array(names, pa.string(), mask=~ok),
        "confidence": pa.array(conf, pa.float32(), mask=~ok),
        "probs": pa.ListArray.from_arrays(offsets, values, type=pa.list_(pa.float32()), mask=null),
        "entropy": pa.array(entropy, pa.float32(), mask=~ok),
        LABEL: batch.column(LABEL) if LABEL in schema.names else None,
        ERROR: batch.column(ERROR),
    }
    return pa.Table.from_arrays([cols[f.name] for f in schema], schema=schema)


# ---------------------------------------------------------------- output directory protocol


@contextmanager
def _exclusive(out: Path) -> Iterator[None]:
    import fcntl

    fh = open(out / LOCK, "a+")
    try:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"{out}: another infer run is writing here (lock {out / LOCK} is held)") from None
        yield
    finally:
        fh.close()  # releases the lock; a killed process releases it too


def _staged_counts(staging: Path) -> list[tuple[Path, int, int]]:
    """(file, rows, error rows) from Parquet footers: null counts of `error` come from column
    statistics, so counting never reads the data pages."""
    out = []
    for f in sorted(staging.glob("*.parquet")):
        md = pq.ParquetFile(f).metadata
        col = md.schema.names.index(ERROR)
        nulls = 0
        for rg in range(md.num_row_groups):
            stats = md.row_group(rg).column(col).statistics
            if stats is None or not stats.has_null_count:
                nulls = None
                break
            nulls += stats.null_count
        if nulls is None:
            nulls = pq.read_table(f, columns=[ERROR]).column(ERROR).null_count
        out.append((f, md.num_rows, md.num_rows - nulls))
    return out


def _publish(out: Path, staged: list[tuple[Path, int, int]], run_id: str) -> list[dict[str, Any]]:
    (out / MANIFEST).unlink(missing_ok=True)  # from here until step 5, OUT claims nothing
    for old in out.glob("*.parquet"):
        old.unlink()
    files = []
    for i, (src, rows, errors) in enumerate(staged):
        name = f"part-{run_id}-{i:05d}.parquet"
        os.replace(src, out / name)
        files.append({"name": name, "rows": rows, "error_rows": errors})
    return files


def _write_manifest(out: Path, manifest: dict[str, Any]) -> None:
    tmp = out / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, out / MANIFEST)


def read_manifest(out: str | Path) -> dict[str, Any]:
    """The manifest of a completed run; UserError when OUT is missing, incomplete or not predictions."""
    p = Path(out) / MANIFEST
    if not Path(out).is_dir():
        raise UserError(f"{out}: no such predictions directory")
    if not p.is_file():
        raise UserError(f"{out}: no {MANIFEST} (not a predictions directory, or its infer run did not finish)")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{p}: invalid JSON ({e.msg} at line {e.lineno})") from None


def prediction_files(out: str | Path) -> list[Path]:
    """The files a completed run published (from its manifest, never a directory listing)."""
    m = read_manifest(out)
    files = [Path(out) / f["name"] for f in m.get("files", [])]
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise UserError(f"{out}: manifest lists {missing[0].name}, which is missing (rerun infer)")
    return files


# ---------------------------------------------------------------- the job


def _guard_fsspec_http_import() -> None:
    # Ray Data probes fsspec's HTTPFileSystem while resolving paths and only catches ModuleNotFoundError.
    # Without aiohttp, two threads importing the failing module at once can leave one holding the
    # half-initialized module -> "cannot import name 'HTTPFileSystem'" (ImportError), failing the job.
    # A None entry makes every later import raise ModuleNotFoundError at once, in this process.
    try:
        import fsspec.implementations.http  # noqa: F401
    except ImportError:
        sys.modules["fsspec.implementations.http"] = None  # type: ignore[assignment]


# Ray Data notices that are noise for this job: bars are off by our choice, and the "no available CPUs,
# the job will hang" check samples a resource view that lags actor shutdown of the previous job; our
# pool sizing already guarantees CPUs for the tasks (and plan_actors fails fast when there are none).
_NOISE = ("Progress bars disabled", "Warning: The Ray cluster currently does not have any available CPUs")
_NOISY_LOGGERS = ("ray.data._internal.progress", "ray.data.dataset")


def _not_noise(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith(_NOISE)


@contextmanager
def _quiet_ray_data() -> Iterator[None]:
    """No progress bars unless stderr is a terminal, no per-run INFO lines; warnings still show."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    saved = (ctx.enable_progress_bars, ctx.print_on_execution_start)
    ctx.enable_progress_bars = sys.stderr.isatty()
    ctx.print_on_execution_start = False
    log = logging.getLogger("ray.data")
    level = log.level
    log.setLevel(logging.WARNING)
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).addFilter(_not_noise)
    try:
        yield
    finally:
        ctx.enable_progress_bars, ctx.print_on_execution_start = saved
        log.setLevel(level)
        for name in _NOISY_LOGGERS:
            logging.getLogger(name).removeFilter(_not_noise)


def _read(files: list[Path], columns: list[str], num_cpus: float):
    import ray
    from ray.data import DataContext

    # The V1 Parquet datasource resolves paths once, in the driver. Ray 2.60's default V2 lists files in
    # ListFiles tasks whose threads race on the failing fsspec HTTP import (no aiohttp installed) and
    # intermittently fail the job with "cannot import name 'HTTPFileSystem'" (1 in 3 runs here).
    # No decoding-size sampling: it runs extra Ray tasks (seconds of worker start-up per job) to
    # estimate a decompression ratio that is ~1 for already-compressed image bytes.
    ctx = DataContext.get_current()
    saved = ctx.use_datasource_v2, ctx.decoding_size_estimation
    ctx.use_datasource_v2, ctx.decoding_size_estimation = False, False
    try:
        return ray.data.read_parquet([str(f) for f in files], columns=columns, num_cpus=num_cpus)
    finally:
        ctx.use_datasource_v2, ctx.decoding_size_estimation = saved


def _wait_for_release(cpus: float, timeout_s: float = 10.0) -> None:
    """Ray Data kills the actor pool asynchronously after the last batch; wait (briefly) until the CPUs
    are back, so a job started right after this one is not sized from a half-released cluster."""
    from imgcls_dist.ray_utils import available_cpus

    deadline = time.monotonic() + timeout_s
    while available_cpus() < cpus and time.monotonic() < deadline:
        time.sleep(0.1)


def _input_columns(files: list[Path]) -> tuple[bool, bool]:
    """(with_label, label_mixed): label is passed through only when every file has it."""
    has = [LABEL in pq.read_schema(f).names for f in files]
    return all(has), any(has) and not all(has)


def run_batch_inference(
    models: str | Path | Sequence[str | Path],
    input: str | Path | Sequence[str | Path],
    output: str | Path,
    *,
    tta: str | Sequence[str] | None = None,
    batch_size: int = 128,
    weights: Sequence[float] | None = None,
    combine: str | None = None,
    num_actors: int | None = None,
    verbose: bool = True,
) -> dict[str, Any]:
    """Predict every row of `input` with the ensemble `models`, write OUT per design.md; returns the manifest.

    `models`: one ensemble.json, or model files/dirs. `weights`/`combine` override the manifest's;
    combine None -> the manifest's, else "weighted" with weights, else "mean".
    """
    import ray

    from imgcls_dist.infer.predictor import EnsemblePredictor, resolve_ensemble
    from imgcls_dist.ray_utils import available_cpus, cluster_cpus, cluster_gpus, ensure_ray

    say = print if verbose else (lambda *a, **k: None)
    t0 = time.perf_counter()
    # -- validate everything before any work
    files = list_parquet(input)
    rows_in = validate_files(files, require_id=True)
    with_label, label_mixed = _input_columns(files)
    model_paths, weights, combine = resolve_ensemble(models, weights, combine)
    # Built once on CPU here so a bad file, arch/weights mismatch or class mismatch fails now, not in an actor.
    probe = EnsemblePredictor(model_paths, views=tta, weights=weights, combine=combine, device="cpu",
                              batch_size=batch_size)
    views, keys, members, classes = probe.views, probe.input_keys, probe.describe(), probe.classes
    combine, norm_weights = probe.combine, probe.weights
    del probe
    out = Path(output)
    resolved_out = out.resolve()
    if any(f.resolve().parent == resolved_out for f in files):
        raise UserError(f"{out}: output directory holds input files; its *.parquet would be replaced")
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)

    ensure_ray()
    _guard_fsspec_http_import()
    # available, not total: a Tune trial or another job may hold some; fall back when the view lags.
    cpus_before = min(available_cpus() or cluster_cpus(), cluster_cpus())
    plan = plan_actors(cpus_before, cluster_gpus(), num_actors)
    run_id = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"
    model_list = ", ".join(f"{m['arch']}@{m['image_size']}" for m in members)
    say(f"infer {run_id}: {rows_in} rows in {len(files)} files, {len(members)} model(s) "
        f"[{model_list}], views {','.join(views)}, "
        f"combine {combine}, {plan.num_actors} actor(s) x {plan.cpus_per_actor:g} CPU"
        + (f" x {plan.gpus_per_actor:g} GPU" if plan.gpus_per_actor else ""), flush=True)
    if label_mixed:
        print("infer: note: only some input files have a 'label' column; labels are not passed through",
              file=sys.stderr)

    with _exclusive(out):
        for stale in out.glob(f"{STAGING_PREFIX}*"):
            shutil.rmtree(stale, ignore_errors=True)
        staging = out / f"{STAGING_PREFIX}{run_id}"
        cols = [ID, IMAGE] + ([LABEL] if with_label else [])
        with _quiet_ray_data():
            try:
                ds = _read(files, cols, plan.task_cpus)
                ds = ds.map_batches(decode_batch, fn_kwargs={"keys": keys, "with_label": with_label},
                                    batch_format="pyarrow", batch_size=batch_size, num_cpus=plan.task_cpus,
                                    udf_modifying_row_count=False)
                ds = ds.map_batches(
                    PredictActor,
                    fn_constructor_kwargs=dict(model_paths=model_paths, views=views, weights=weights, combine=combine,
                                               batch_size=batch_size, torch_threads=plan.torch_threads,
                                               with_label=with_label),
                    compute=ray.data.ActorPoolStrategy(size=plan.num_actors),
                    num_cpus=plan.cpus_per_actor, num_gpus=plan.gpus_per_actor or None,
                    batch_size=batch_size, batch_format="pyarrow", udf_modifying_row_count=False,
                )
                ds.write_parquet(str(staging), min_rows_per_file=ROWS_PER_FILE,
                                 ray_remote_args={"num_cpus": plan.task_cpus})
            except (UserError, JobFailed):
                raise
            except Exception as e:  # Ray wraps actor/task failures; the staging dir stays hidden
                raise JobFailed(f"inference job failed: {root_cause(e)}") from e
            finally:
                _wait_for_release(cpus_before)
        staging.mkdir(exist_ok=True)  # zero input rows -> Ray writes no files
        staged = _staged_counts(staging)
        rows_out = sum(r for _, r, _ in staged)
        if rows_out != rows_in:
            raise JobFailed(f"rows out {rows_out} != rows in {rows_in}; nothing published "
                            f"(staged output kept in {staging})")
        published = _publish(out, staged, run_id)
        shutil.rmtree(staging, ignore_errors=True)
        wall = time.perf_counter() - t0
        manifest = {
            "run_id": run_id,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "complete": True,
            "input_files": [str(f) for f in files],
            "rows_in": rows_in,
            "rows_out": rows_out,
            "error_rows": sum(f["error_rows"] for f in published),
            "label_passthrough": with_label,
            "classes": classes,
            "models": members,
            "tta_views": views,
            "combine": combine,
            "weights": norm_weights,
            "batch_size": batch_size,
            "actors": asdict(plan),
            "wall_s": round(wall, 3),
            "images_per_s": round(rows_in / wall, 2) if wall > 0 else None,
            "files": published,
        }
        _write_manifest(out, manifest)
    say(f"infer {run_id}: {rows_out} rows ({manifest['error_rows']} errors) in {wall:.1f}s, "
        f"{manifest['images_per_s']} img/s -> {out}", flush=True)
    return manifest
