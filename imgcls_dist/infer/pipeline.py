"""Batch inference with Ray Data: Parquet shards in, design.md predictions out, every row accounted for.

Stages (`infer/stages.py`): read_parquet (only id/image/label) -> decode+resize in CPU tasks (a row that
cannot be decoded gets zeros and an `error` string; nothing is raised per row) -> ensembled TTA on a fixed
actor pool (GPU when the cluster has one) -> write_parquet into a staging directory. Nothing is
materialized in the driver: memory depends on block and batch sizes, not on the number of input rows.
Inputs, models and OUT may each be a local path, s3:// or gs:// (`imgcls_dist.storage`); Ray Data reads
and writes through the same pyarrow filesystem.

Actor-pool sizing (see `plan_actors`): Ray Data needs CPUs for read/decode and write tasks while the pool
holds its own; a pool that takes every CPU hangs forever, silently (seen on 2 CPUs: 2 one-CPU actors +
read tasks). So a quarter of the CPUs (at least 1) is kept for 0.5-CPU tasks and the pool shares the
rest: on 2 CPUs, 1 actor x 1 CPU beside two 0.5-CPU decode tasks; on 16, 12 actors and 4 CPUs of tasks.

Output protocol: `infer/publish.py` (a lease instead of a lock, staging, the manifest as commit point).

The job is four named steps: `validate_job` (inputs, models, OUT; before any Ray work), `plan_job`
(actors from what the cluster has free), `execute` (the Ray Data pipeline into staging) and `publish_job`
(count, publish, commit).
"""

from __future__ import annotations

import logging
import math
import sys
import time
import uuid
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Iterator, Sequence

import pyarrow.parquet as pq

from imgcls_dist.data.schema import ID, IMAGE, LABEL, list_parquet, validate_files
from imgcls_dist.errors import JobFailed, UserError, root_cause
from imgcls_dist.infer import publish
from imgcls_dist.infer.publish import STAGING_PREFIX, prediction_files, read_manifest  # noqa: F401 - re-exported
from imgcls_dist.infer.ray_data_compat import read_parquet
from imgcls_dist.infer.stages import PredictActor, decode_batch
from imgcls_dist.storage import Location, PathLike, location

# Output files of at least this many rows (Ray writes one file per block otherwise: one per batch).
ROWS_PER_FILE = 20_000


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


# ---------------------------------------------------------------- console


@contextmanager
def _quiet_ray_data() -> Iterator[None]:
    """No progress bars unless stderr is a terminal, no per-run INFO lines; warnings still show (Ray's pure
    noise is filtered in `imgcls_dist.console`)."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    saved = (ctx.enable_progress_bars, ctx.print_on_execution_start)
    ctx.enable_progress_bars = sys.stderr.isatty()
    ctx.print_on_execution_start = False
    log = logging.getLogger("ray.data")
    level = log.level
    log.setLevel(logging.WARNING)
    try:
        yield
    finally:
        ctx.enable_progress_bars, ctx.print_on_execution_start = saved
        log.setLevel(level)


# ---------------------------------------------------------------- the job


@dataclass
class InferJob:
    """Everything validated before any Ray work: inputs, ensemble, output directory."""

    files: list[Location]
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
    from imgcls_dist.ensemble.manifest import print_spread_note, resolve_ensemble
    from imgcls_dist.infer.predictor import EnsemblePredictor

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
    return InferJob(files, rows_in, with_label, spec.paths, spec.weights, probe.combine, probe.views,
                    probe.input_keys, probe.describe(), probe.classes, probe.weights, probe.temperatures,
                    batch_size, out)


def plan_job(num_actors: int | None) -> tuple[ActorPlan, float]:
    """(actor plan, CPUs free before the job): sized from what is free now, not the cluster's total
    (a Tune trial or another job may hold some); falls back to the total while the view lags."""
    from imgcls_dist.ray_utils import available_cpus, cluster_cpus, cluster_gpus, ensure_ray

    ensure_ray()
    cpus_before = min(available_cpus() or cluster_cpus(), cluster_cpus())
    return plan_actors(cpus_before, cluster_gpus(), num_actors), cpus_before


def _read(job: InferJob, num_cpus: float):
    cols = [ID, IMAGE] + ([LABEL] if job.with_label else [])
    return read_parquet([f.path for f in job.files], filesystem=job.files[0].fs, columns=cols, num_cpus=num_cpus)


def _wait_for_release(cpus: float, timeout_s: float = 10.0) -> None:
    """Ray Data kills the actor pool asynchronously after the last batch; wait (briefly) until the CPUs
    are back, so a job started right after this one is not sized from a half-released cluster."""
    from imgcls_dist.ray_utils import available_cpus

    deadline = time.monotonic() + timeout_s
    while available_cpus() < cpus and time.monotonic() < deadline:
        time.sleep(0.1)


def execute(job: InferJob, plan: ActorPlan, staging: Location, cpus_before: float) -> None:
    """The Ray Data pipeline, written into `staging`; Ray's failures become one JobFailed line."""
    import ray

    with _quiet_ray_data():
        try:
            ds = _read(job, plan.task_cpus)
            ds = ds.map_batches(decode_batch, fn_kwargs={"keys": job.keys, "with_label": job.with_label},
                                batch_format="pyarrow", batch_size=job.batch_size, num_cpus=plan.task_cpus,
                                udf_modifying_row_count=False)
            ds = ds.map_batches(
                PredictActor,
                fn_constructor_kwargs=dict(model_paths=job.model_paths, views=job.views, weights=job.weights,
                                           combine=job.combine, temperatures=job.temperatures,
                                           batch_size=job.batch_size,
                                           torch_threads=plan.torch_threads, with_label=job.with_label),
                compute=ray.data.ActorPoolStrategy(size=plan.num_actors),
                num_cpus=plan.cpus_per_actor, num_gpus=plan.gpus_per_actor or None,
                batch_size=job.batch_size, batch_format="pyarrow", udf_modifying_row_count=False,
            )
            ds.write_parquet(staging.path, filesystem=staging.fs, min_rows_per_file=ROWS_PER_FILE,
                             ray_remote_args={"num_cpus": plan.task_cpus})
        except (UserError, JobFailed):
            raise
        except Exception as e:  # Ray wraps actor/task failures; the staging dir stays hidden
            raise JobFailed(f"inference job failed: {root_cause(e)}") from e
        finally:
            _wait_for_release(cpus_before)


def publish_job(job: InferJob, plan: ActorPlan, staging: Location, lease: publish.Lease, run_id: str,
                t0: float) -> dict[str, Any]:
    """Count the staged rows, publish them and commit the manifest (infer/publish.py, steps 3-5)."""
    staged = publish.staged_counts(staging)
    rows_out = sum(r for _, r, _ in staged)
    if rows_out != job.rows_in:
        raise JobFailed(f"rows out {rows_out} != rows in {job.rows_in}; nothing published "
                        f"(staged output kept in {staging})")
    lease.check()
    published = publish.publish(job.out, staged, run_id)
    staging.delete()
    wall = time.perf_counter() - t0
    manifest = {
        "run_id": run_id,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "complete": True,
        "input_files": [f.uri for f in job.files],
        "rows_in": job.rows_in,
        "rows_out": rows_out,
        "error_rows": sum(f["error_rows"] for f in published),
        "label_passthrough": job.with_label,
        "classes": job.classes,
        "models": job.members,
        "tta_views": job.views,
        "combine": job.combine,
        "weights": job.norm_weights,
        "temperatures": job.temperatures,
        "batch_size": job.batch_size,
        "actors": asdict(plan),
        "wall_s": round(wall, 3),
        "images_per_s": round(job.rows_in / wall, 2) if wall > 0 else None,
        "files": published,
    }
    publish.commit(job.out, manifest)
    return manifest


def run_batch_inference(
    models: PathLike | Sequence[PathLike],
    input: PathLike | Sequence[PathLike],
    output: PathLike,
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
    say = print if verbose else (lambda *a, **k: None)
    t0 = time.perf_counter()
    job = validate_job(models, input, output, tta=tta, batch_size=batch_size, weights=weights, combine=combine)
    plan, cpus_before = plan_job(num_actors)
    run_id = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"
    model_list = ", ".join(f"{m['arch']}@{m['image_size']}" for m in job.members)
    say(f"infer {run_id}: {job.rows_in} rows in {len(job.files)} files, {len(job.members)} model(s) "
        f"[{model_list}], views {','.join(job.views)}, combine {job.combine}, "
        f"{plan.num_actors} actor(s) x {plan.cpus_per_actor:g} CPU"
        + (f" x {plan.gpus_per_actor:g} GPU" if plan.gpus_per_actor else "") + f" -> {job.out}", flush=True)
    with publish.exclusive(job.out, run_id) as lease:
        staging = job.out / f"{STAGING_PREFIX}{run_id}"
        execute(job, plan, staging, cpus_before)
        manifest = publish_job(job, plan, staging, lease, run_id, t0)
    say(f"infer {run_id}: {manifest['rows_out']} rows ({manifest['error_rows']} errors) in {manifest['wall_s']:.1f}s, "
        f"{manifest['images_per_s']} img/s -> {job.out}", flush=True)
    return manifest
