"""Batch inference with Ray Data: Parquet shards in, predictions out (docs/design.md, "Predictions"), every
row accounted for.

`run_batch_inference` runs five steps: `validate_job`, `resume.take_over`, `plan_job` (the actor pool sized by
`plan_actors`), `execute` (read -> decode tasks -> predictor actor pool -> staged parts) and `publish_job`.
Stages and actor-pool sizing: docs/design.md, "Batch inference pipeline".
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

from imgcls_dist.data.schema import ID, IMAGE, LABEL
from imgcls_dist.errors import JobFailed, Stopped, UserError, root_cause
from imgcls_dist.batch import parts, publish, resume
from imgcls_dist.batch.job import InferJob, validate_job
from imgcls_dist.predictor.decode_mode import resolve_decode
from imgcls_dist.preemption import DEFAULT_GRACE_S, stop_on_sigterm
from imgcls_dist.storage import Location, PathLike, location
from imgcls_dist.predictor.options import BATCH_SIZE


# ---------------------------------------------------------------- actor-pool sizing


@dataclass(frozen=True)
class ActorPlan:
    num_actors: int
    cpus_per_actor: float
    gpus_per_actor: float
    task_cpus: float  # num_cpus of each read/decode and write task
    torch_threads: int


# A GPU actor's call holds this many predictor micro-batches: within a call the H2D copy of each overlaps the
# forward of the one before (predictor/device_feed.py); a call of one micro-batch has nothing to overlap with.
MICRO_BATCHES_PER_GPU_CALL = 4


def plan_actors(available_cpus: float, gpus: float, requested: int | None = None) -> ActorPlan:
    """Size the predictor pool so read/decode/write tasks always have CPUs left beside it.

    A quarter of the CPUs, at least 1 (half of them below 2), is kept out of the pool for tasks:
    on one core, decoding + resizing a digit PNG costs a small fraction of the lenet5 forward over the 6
    default views (docs/benchmarks.md, "Batch inference"), and the fraction is far smaller for bigger
    models, so a quarter keeps decode off the critical path. Tasks ask for 0.5 CPU: two run per reserved core,
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


def plan_job(num_actors: int | None) -> tuple[ActorPlan, float]:
    """(actor plan, CPUs free before the job): sized from what is free now, not the cluster's total
    (a Tune trial or another job may hold some); falls back to the total while the view lags."""
    from imgcls_dist.ray_utils import available_cpus, cluster_cpus, cluster_gpus, ensure_ray

    ensure_ray()
    cpus_before = min(available_cpus() or cluster_cpus(), cluster_cpus())
    return plan_actors(cpus_before, cluster_gpus(), num_actors), cpus_before


def _read(job: InferJob, todo: dict[int, list[tuple[int, int]]], num_cpus: float, stop_flag):
    """The rows still to predict, in blocks of at most a part's rows: a read task yields whole row groups
    (a file written with pyarrow's defaults is one row group of up to a million rows), and Ray Data's streaming
    repartition cuts them, so the rows in flight, and so the work a kill loses, are bounded by rows whatever
    the input's layout (docs/benchmarks.md, "Bulk inference under preemption")."""
    import ray

    cols = [ID, IMAGE] + ([LABEL] if job.with_label else [])
    rows = parts.rows_per_part(job.rows_in)
    source = parts.ShardRows(job.layout, parts.plan_units(job.layout, todo, rows), cols, stop_flag)
    return ray.data.read_datasource(source, num_cpus=num_cpus).repartition(target_num_rows_per_block=rows)


def _wait_for_release(cpus: float, timeout_s: float = 10.0) -> None:
    """Ray Data kills the actor pool asynchronously after the last batch; wait (briefly) until the CPUs
    are back, so a job started right after this one is not sized from a half-released cluster."""
    from imgcls_dist.ray_utils import available_cpus

    deadline = time.monotonic() + timeout_s
    while available_cpus() < cpus and time.monotonic() < deadline:
        time.sleep(0.1)


def execute(job: InferJob, plan: ActorPlan, takeover: resume.Takeover, run_id: str, cpus_before: float,
            decode: str, compile: bool = False, precision: str = "auto", backend: str = "torch",
            calibration: str | None = None, stop_flag=None) -> None:
    """The Ray Data pipeline over the rows still to predict, written as parts into the staging directory;
    Ray's failures become one JobFailed line. decode "cpu": decode tasks feed the actors pixels; "device":
    the actors get the encoded rows and decode them themselves (predictor/device_decode.py). compile: the actors
    torch.compile their members (EnsemblePredictor). precision, backend: as resolved by the driver, so that every
    actor runs what its fingerprint says; calibration: int8's dataset (each actor calibrates on the same images).
    stop_flag (preemption.py): once set, no new rows are read or predicted, and those predicted are written."""
    import ray

    with _quiet_ray_data():
        try:
            ds = _read(job, takeover.todo, plan.task_cpus, stop_flag)
            if decode == "cpu":
                ds = ds.map_batches(parts.decode_positioned, fn_kwargs={"keys": job.keys, "with_label": job.with_label},
                                    batch_format="pyarrow", batch_size=job.batch_size, num_cpus=plan.task_cpus,
                                    udf_modifying_row_count=False)
            ds = ds.map_batches(
                parts.PositionedPredictActor if decode == "cpu" else parts.PositionedDevicePredictActor,
                fn_constructor_kwargs=dict(model_paths=job.model_paths, views=job.views, weights=job.weights,
                                           combine=job.combine, temperatures=job.temperatures,
                                           batch_size=job.batch_size,
                                           torch_threads=plan.torch_threads, with_label=job.with_label,
                                           compile=compile, precision=precision, backend=backend,
                                           calibration=calibration, stop_flag=stop_flag),
                compute=ray.data.ActorPoolStrategy(size=plan.num_actors),
                num_cpus=plan.cpus_per_actor, num_gpus=plan.gpus_per_actor or None,
                batch_size=job.batch_size * (MICRO_BATCHES_PER_GPU_CALL if plan.gpus_per_actor else 1),
                batch_format="pyarrow", udf_modifying_row_count=True,  # none once asked to stop
            )
            ds.write_datasink(parts.PartsDatasink(takeover.staging, run_id, parts.rows_per_part(job.rows_in)),
                              ray_remote_args={"num_cpus": plan.task_cpus})
        except (UserError, JobFailed) as e:
            if isinstance(e, ray.exceptions.RayTaskError):  # raised in a task: its text carries Ray's traceback
                local = JobFailed if isinstance(e, JobFailed) else UserError
                raise local(f"inference job failed: {str(e.args[0]).splitlines()[0]}") from None
            raise
        except Exception as e:  # Ray wraps actor/task failures; the staging dir stays hidden
            raise JobFailed(f"inference job failed: {root_cause(e)}") from e
        finally:
            _wait_for_release(cpus_before)


def _stopped(job: InferJob, takeover: resume.Takeover, run_id: str, reason: str) -> Stopped:
    written = takeover.rows_adopted + sum(p.rows for p in own_parts(takeover.staging, run_id))
    return Stopped(f"infer {run_id}: {reason}: {written} of {job.rows_in} rows are written (staged in {job.out}); "
                   f"the same command again predicts the other {job.rows_in - written}")


def own_parts(staging: Location, run_id: str) -> list[parts.Part]:
    """The parts this run wrote (its id in their names); parts a dead run landed late are not among them."""
    return parts.read_parts([f for f in parts.staged_parts(staging) if parts.writer_of(f) == run_id])


def publish_job(job: InferJob, plan: ActorPlan, takeover: resume.Takeover, lease: publish.Lease, run_id: str,
                t0: float, decode: str, precision: str, backend: str, calibration: str | None) -> dict[str, Any]:
    """Check that adopted + own parts hold every input row once, publish them in input order and commit the
    manifest (batch/publish.py, steps 3-5)."""
    own = own_parts(takeover.staging, run_id)
    chosen = sorted(takeover.adopted + own, key=lambda p: p.ranges[0])
    resume.check_exact(chosen, job.layout, takeover.staging)
    rows_out = sum(p.rows for p in chosen)
    lease.check()
    published = publish.publish(job.out, [(p.loc, p.rows, p.error_rows) for p in chosen], run_id)
    for entry, p in zip(published, chosen):
        entry["written_by"] = p.writer
    takeover.staging.delete()
    rows_predicted = sum(p.rows for p in own)
    wall = time.perf_counter() - t0
    manifest = {
        "run_id": run_id,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "complete": True,
        "input_files": [f.uri for f in job.files],
        "rows_in": job.rows_in,
        "rows_out": rows_out,
        "rows_predicted": rows_predicted,  # by this run; the rest it adopted from the run it resumed
        "rows_adopted": takeover.rows_adopted,
        "resumed_from": takeover.resumed_from,
        "error_rows": sum(f["error_rows"] for f in published),
        "label_passthrough": job.with_label,
        "classes": job.classes,
        "models": job.members,
        "tta_views": job.views,
        "combine": job.combine,
        "weights": job.norm_weights,
        "temperatures": job.temperatures,
        "batch_size": job.batch_size,
        "decode": decode,
        "precision": precision,
        "backend": backend,
        "calibration": calibration,
        "actors": asdict(plan),
        "wall_s": round(wall, 3),
        "images_per_s": round(rows_predicted / wall, 2) if wall > 0 else None,  # this run's own rate
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
    batch_size: int = BATCH_SIZE,
    weights: Sequence[float] | None = None,
    combine: str | None = None,
    num_actors: int | None = None,
    fresh: bool = False,
    decode: str = "auto",
    compile: bool = False,
    precision: str = "auto",
    backend: str = "auto",
    calibration: PathLike | None = None,
    stop_grace_s: float = DEFAULT_GRACE_S,
    verbose: bool = True,
) -> dict[str, Any]:
    """Predict every row of `input` with the ensemble `models`, write OUT as docs/design.md, "Predictions"
    describes; returns the manifest.

    `models`: one ensemble.json, or model files/dirs. `weights`/`combine` override the manifest's;
    combine None -> the manifest's, else "weighted" with weights, else "mean". An unfinished run of the same
    job in OUT is resumed, one of another job refused; `fresh` discards it instead (batch/resume.py).
    `decode`: "auto" (on the actors' GPUs when they have them, else in CPU tasks), "cpu" or "device".
    `compile`: torch.compile each member in the actors (worth it for long jobs on GPUs; measured by
    `python -m benchmarks.gpu_bench`). `precision`: "auto", "fp32" or "bf16", resolved here for the actors'
    device (predictor/precision.py): on a cluster whose nodes differ from the one this runs on, name it.
    `backend`: "auto", "torch" or "onnxruntime", resolved here with the precision (predictor/backend.py).
    `calibration`: with precision "int8", the dataset whose validation images calibrate the quantization.
    SIGTERM while rows are predicted: the rows predicted so far are written as parts within `stop_grace_s`
    and `Stopped` is raised; the same call again predicts the rest.
    """
    from imgcls_dist.predictor.backend import check_backend, check_calibration, choose_runtime
    from imgcls_dist.predictor.precision import check_precision

    say = print if verbose else (lambda *a, **k: None)
    t0 = time.perf_counter()
    check_precision(precision)
    check_backend(backend)
    job = validate_job(models, input, output, tta=tta, batch_size=batch_size, weights=weights, combine=combine)
    run_id = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"
    with publish.exclusive(job.out, run_id) as lease:
        plan, cpus_before = plan_job(num_actors)
        decode = resolve_decode(decode, plan.gpus_per_actor)
        runtime, chosen = choose_runtime(backend, precision, "cuda" if plan.gpus_per_actor else "cpu")
        check_calibration(chosen.precision, calibration)
        calib = None if calibration is None else location(calibration).uri
        fp = resume.fingerprint(job, run_id, decode, chosen.precision, runtime.backend, calib)
        takeover = resume.take_over(job.out, fp, job.layout, run_id, fresh)
        model_list = ", ".join(f"{m['arch']}@{m['image_size']}" for m in job.members)
        say(f"infer {run_id}: {job.rows_in} rows in {len(job.files)} files, {len(job.members)} model(s) "
            f"[{model_list}], views {','.join(job.views)}, combine {job.combine}, "
            f"{plan.num_actors} actor(s) x {plan.cpus_per_actor:g} CPU"
            + (f" x {plan.gpus_per_actor:g} GPU" if plan.gpus_per_actor else "") + f", decode on {decode}, "
            + f"{chosen}, {runtime} -> {job.out}", flush=True)
        if takeover.resumed_from:
            say(f"infer {run_id}: resuming run {takeover.resumed_from}: {takeover.rows_adopted} rows already written "
                f"({len(takeover.adopted)} parts), predicting the other {takeover.rows_todo}", flush=True)
        if takeover.rows_todo:
            with stop_on_sigterm(f"infer {run_id}", stop_grace_s) as stop:
                execute(job, plan, takeover, run_id, cpus_before, decode, compile, chosen.precision,
                        runtime.backend, calib, stop.flag)
            if stop.reason:
                raise _stopped(job, takeover, run_id, stop.reason)
        manifest = publish_job(job, plan, takeover, lease, run_id, t0, decode, chosen.precision, runtime.backend,
                               calib)
    say(f"infer {run_id}: {manifest['rows_out']} rows ({manifest['error_rows']} errors) in {manifest['wall_s']:.1f}s, "
        f"{manifest['images_per_s']} img/s -> {job.out}", flush=True)
    return manifest
