"""Driver side of `imgcls-dist train`: validate, size the run, launch the TorchTrainer, write reports."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imgcls_dist.config import CONFIG_FILE, ExperimentConfig, write_config
from imgcls_dist.data.schema import hflip_allowed, validate_dataset, validate_files
from imgcls_dist.errors import JobFailed, Stopped, UserError, root_cause
from imgcls_dist.evaluate.files import CONFUSION_PLOT, REPORT_TXT
from imgcls_dist.evaluate.plots import plot_training_history
from imgcls_dist.models.checkpoint import MODEL_FILE, load_model_file
from imgcls_dist.models.registry import get_spec
from imgcls_dist.models.weights import classify as classify_weights
from imgcls_dist.preemption import stop_on_sigterm
from imgcls_dist.storage import Location, location, ray_storage
from imgcls_dist.train.distill import check_teacher
from imgcls_dist.train.mixed_precision import describe_mixed_precision
from imgcls_dist.train.state import MID_EPOCH, load_history
from imgcls_dist.train.stream import list_row_groups, optimizer_steps, total_rows
from imgcls_dist.train.subset import balanced_class_weights, oversample_row_groups, subset_row_groups

if TYPE_CHECKING:
    from imgcls_dist.train.tracked import Link, Tracking

METRICS_FILE = "metrics.csv"
SUMMARY_FILE = "summary.json"
HISTORY_PLOT = "training_history.png"
# What a finished run's MLflow run gets copies of (those that exist: the test report needs test rows).
RUN_ARTIFACTS = (CONFIG_FILE, METRICS_FILE, MODEL_FILE, SUMMARY_FILE, HISTORY_PLOT, CONFUSION_PLOT, REPORT_TXT)

# val_loss/val_acc: of the weights the epoch exports; raw_*/ema_*: both, with train.ema_decay (blank without)
HISTORY_COLUMNS = ["epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "raw_val_loss", "raw_val_acc",
                   "ema_val_loss", "ema_val_acc", "ema_exported", "images_per_s", "image_size",
                   "train_samples", "unique_samples", "worker_samples", "skipped_rows", "nonfinite_steps",
                   "peak_rss_mb", "peak_gpu_mb", "world_size"]  # world_size: the workers the epoch ended on


def resolve_dataset(cfg: ExperimentConfig) -> dict[str, Any]:
    """Everything the workers need to know about the data, checked before any Ray work starts."""
    meta = validate_dataset(cfg.data.path, splits=("train", "val"))
    spec = get_spec(cfg.model.arch)
    try:
        classify_weights(cfg.model.weights)  # a missing checkpoint file fails here, not in every worker
    except UserError as e:
        raise UserError(f"model.weights: {e}") from None
    image_size = cfg.data.image_size or meta.get("image_size") or spec.default_size
    for where, size in [("data.image_size", image_size)] + [
        ("train.progressive_resizing", s) for _, s in cfg.train.progressive_resizing
    ]:
        if size < spec.min_size:
            raise UserError(f"{where}: {size}px is below {cfg.model.arch}'s minimum input size {spec.min_size}px")
    for split in ("train", "val"):
        if not meta["rows"][split]:
            raise UserError(f"data.path: the {split} split of {cfg.data.path} is empty (training needs {split} rows"
                            + ("; validation accuracy picks the checkpoints" if split == "val" else "")
                            + "): ingest with --splits giving it a share")
    test_dir = location(cfg.data.path) / "test"
    test_files = test_dir.files(".parquet", recursive=False)
    # The row groups (footers only) are what the workers stream: a list of (file, group, rows), whatever
    # the dataset's size in bytes.
    train_files = [f.uri for f in meta["files"]["train"]]
    d = cfg.data
    seed = cfg.train.seed if d.subset_seed is None else d.subset_seed
    if d.train_per_class is not None or d.train_fraction is not None:
        train_groups = subset_row_groups(
            train_files, meta["classes"], seed=seed, per_class=d.train_per_class, fraction=d.train_fraction)
    else:
        train_groups = list_row_groups(train_files, limit=d.max_train_samples)
    if d.balance == "oversample":  # before the class weights: they then count the balanced epoch
        train_groups = oversample_row_groups(train_groups, len(meta["classes"]), seed)
    val_groups = list_row_groups([f.uri for f in meta["files"]["val"]], limit=cfg.data.max_val_samples)
    if cfg.train.teacher:
        check_teacher(cfg.train.teacher, meta["classes"])
    weights = (balanced_class_weights(train_groups, len(meta["classes"])) if cfg.train.class_weights == "balanced"
               else None)
    return {
        "classes": meta["classes"],
        "image_size": int(image_size),
        "hflip": cfg.augment.hflip if cfg.augment.hflip is not None else hflip_allowed(meta),
        "train_groups": train_groups,
        "val_groups": val_groups,
        "train_rows": total_rows(train_groups),
        "test_files": [f.uri for f in test_files],
        "class_weights": weights,  # per class, None: unweighted loss
    }


def resolve_scaling(cfg: ExperimentConfig, train_rows: int | None = None) -> tuple[int, bool]:
    from imgcls_dist.ray_utils import cluster_cpus, cluster_gpus, plan_workers

    s = cfg.scaling
    plan = plan_workers(s.num_workers, s.use_gpu, s.cpus_per_worker, cluster_cpus(), cluster_gpus())
    if train_rows is not None and train_rows < plan.num_workers:
        raise UserError(f"scaling.num_workers: {plan.num_workers} workers for {train_rows} training rows "
                        "(every worker needs at least one)")
    return plan.num_workers, plan.use_gpu


def elastic_workers(cfg: ExperimentConfig, num_workers: int) -> int | tuple[int, int]:
    """Train's num_workers: (scaling.min_workers, the planned count) when the run may shrink, else the count."""
    low = cfg.scaling.min_workers
    if low is None or low >= num_workers or num_workers == 0:
        if low is not None and low > num_workers > 0:
            raise UserError(f"scaling.min_workers: {low} is more than the run's {num_workers} worker(s)")
        return num_workers
    return (low, num_workers)


def run_location(cfg: ExperimentConfig) -> Location:
    """Where every artifact of this run goes: <run.storage_path>/<run.name>/ on any filesystem."""
    return location(cfg.run.storage_path) / cfg.run.name


def resolve_epochs(cfg: ExperimentConfig, train_rows: int, num_workers: int) -> ExperimentConfig:
    """`train.min_steps` -> the epochs that give at least that many optimizer steps (never fewer than
    train.epochs); the config unchanged without it."""
    t = cfg.train
    if not t.min_steps:
        return cfg
    steps = optimizer_steps(train_rows, max(num_workers, 1), cfg.data.batch_size, t.grad_accum_steps)
    epochs = max(t.epochs, math.ceil(t.min_steps / steps))
    if epochs != t.epochs:
        print(f"train.min_steps={t.min_steps}: {epochs} epochs of {steps} optimizer steps (train.epochs={t.epochs})",
              flush=True)
    return cfg.model_copy(update={"train": t.model_copy(update={"epochs": epochs})})


def build_trainer(cfg: ExperimentConfig, ds: dict[str, Any], num_workers: int, use_gpu: bool, *,
                  callbacks: list | None = None, stop_flag=None):
    """The TorchTrainer for one run (also what each Tune trial launches). stop_flag: the driver's stop request
    (preemption.py), which the workers answer with a checkpoint at the next step (train/preempt.py)."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from imgcls_dist.train.worker_entry import train_loop_per_worker

    single_node = len([n for n in ray.nodes() if n.get("Alive")]) == 1
    if single_node:
        # Single node (local mode): no other node can be preempted, and the watcher is one more Python
        # process per run - real cost on a 2-CPU laptop. Clusters keep Train's default. (Train passes
        # RAY_TRAIN_* variables of the driver on to its controller.)
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    # A worker's report waits until the controller has taken the previous one (a queue of one), and the
    # controller looks every health-check interval, 2 s by default: epochs shorter than that (small data,
    # min_steps stretching a run over hundreds of epochs) would each last 2 s. Polling 8x as often shortens a
    # small-data run several-fold (docs/benchmarks.md, "Short epochs"); a user's setting wins.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
    storage_path, storage_fs = ray_storage(cfg.run.storage_path)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "experiment": cfg.to_dict(),
            "dataset": ds,
            "use_gpu": use_gpu,
            "tensorboard_dir": (run_location(cfg) / "tensorboard").uri if cfg.run.tensorboard else None,
            "stop_flag": stop_flag,
            "watch_drains": not single_node,
        },
        scaling_config=ScalingConfig(num_workers=elastic_workers(cfg, num_workers), use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cfg.scaling.cpus_per_worker}),
        run_config=RunConfig(
            name=cfg.run.name,
            storage_path=storage_path,
            storage_filesystem=storage_fs,  # the same endpoint and credentials as everything else
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints,
                                               checkpoint_score_attribute="val_acc", checkpoint_score_order="max"),
            failure_config=FailureConfig(max_failures=cfg.run.max_failures),
            callbacks=callbacks,
            # Console: our one line per epoch (plain stdout, not re-logged through Train's print patch,
            # which doubled it) and Train's warnings; its INFO chatter stays in its log files.
            logging_config=ray.LoggingConfig(log_level="WARNING"),
            worker_runtime_env={"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}},
        ),
    )


def fit(trainer):
    try:
        return trainer.fit()
    except Exception as e:  # noqa: BLE001 - Ray wraps worker errors; surface the root cause in one line
        raise JobFailed(f"training failed: {root_cause(e)}") from None


def check_tracking(cfg: ExperimentConfig) -> None:
    """Before any work: with run.tracking: mlflow, the server answers and takes the credentials (else one line,
    exit 2)."""
    if cfg.run.tracking == "mlflow":
        from imgcls_dist.tracking.server import check_server

        check_server()


def open_tracking(cfg: ExperimentConfig, out: Location, kind: str = "train",
                  link: Link | None = None) -> Tracking | None:
    """The run's MLflow side (train/tracked.py) with run.tracking: mlflow, else None; MLflow is imported only
    then, so it stays an optional extra."""
    if cfg.run.tracking != "mlflow":
        return None
    from imgcls_dist.train.tracked import start

    return start(cfg, out, kind, link)


def ending(tracking: Tracking | None):
    """Ends the tracked run KILLED/FAILED when the block raises (nothing without tracking)."""
    return tracking.ending() if tracking else nullcontext()


def run_training(cfg: ExperimentConfig, *, report_test: bool = True) -> dict[str, Any]:
    from imgcls_dist.ray_utils import ensure_ray

    check_tracking(cfg)
    ds = resolve_dataset(cfg)
    out = run_location(cfg).check_writable()
    ensure_ray()
    num_workers, use_gpu = resolve_scaling(cfg, ds["train_rows"])
    cfg = resolve_epochs(cfg, ds["train_rows"], num_workers)
    write_config(cfg, out / CONFIG_FILE)
    print(f"training {cfg.model.arch} on {cfg.data.path}: {num_workers} worker(s), "
          f"{'GPU' if use_gpu else 'CPU'}, {cfg.train.epochs} epochs, image {ds['image_size']}px, "
          f"{describe_mixed_precision(cfg.train.mixed_precision, use_gpu)} -> {out}\n"
          f"resolved config: {out / CONFIG_FILE}", flush=True)
    if ds["class_weights"]:
        print(f"class weights (balanced): {min(ds['class_weights']):.3g} to {max(ds['class_weights']):.3g}",
              flush=True)
    tracking = open_tracking(cfg, out)
    t0 = time.perf_counter()
    with ending(tracking):
        with stop_on_sigterm(f"training {cfg.run.name}", cfg.run.stop_grace_s) as stop:
            result = fit(build_trainer(cfg, ds, num_workers, use_gpu, stop_flag=stop.flag,
                                       callbacks=tracking.callbacks() if tracking else None))
        if stop.reason and not _finished(cfg, result):
            raise _stopped(cfg, result, stop.reason)
        summary = finalize_run(result, cfg, ds, out, time.perf_counter() - t0, report_test=report_test)
    if tracking:
        tracking.finish(summary["history"], summary, RUN_ARTIFACTS)
    return summary


def _finished(cfg: ExperimentConfig, result) -> bool:
    """The last epoch was done (the stop request came too late to stop anything): the run is complete."""
    m = result.metrics or {}
    return not m.get(MID_EPOCH) and m.get("epoch") == cfg.train.epochs - 1


def _stopped(cfg: ExperimentConfig, result, reason: str) -> Stopped:
    """Where the stopped run's last checkpoint is (its workers wrote it at the step they stopped after)."""
    m = result.metrics or {}
    if "epoch" not in m:
        at = "before its first checkpoint"
    elif m.get(MID_EPOCH):
        at = f"with a checkpoint at epoch {m['epoch'] + 1}/{cfg.train.epochs}, batch {m['step']}"
    else:
        at = f"with a checkpoint after epoch {m['epoch'] + 1}/{cfg.train.epochs}"
    return Stopped(f"training {cfg.run.name}: {reason}: stopped {at}; the same command again resumes there")


def _export_best_model(result, out: Location):
    """The best checkpoint's model.pt (by val_acc) -> <run>/model.pt; returns (that checkpoint, its metrics)."""
    best_ckpt = result.get_best_checkpoint("val_acc", "max") or result.checkpoint
    with best_ckpt.as_directory() as d:
        (out / MODEL_FILE).upload(Path(d) / MODEL_FILE)
        metrics = load_model_file(Path(d) / MODEL_FILE).get("metrics") or {}
    return best_ckpt, metrics


def finalize_run(result, cfg: ExperimentConfig, ds: dict, out: Location, wall_s: float,
                 report_test: bool = True) -> dict[str, Any]:
    """Every artifact first (model.pt, metrics.csv, plot, summary.json), then the optional test report:
    a failing report costs the report, never the run."""
    if result.checkpoint is None:
        raise JobFailed("training produced no checkpoint")
    with result.checkpoint.as_directory() as d:
        history = load_history(d)
    best_ckpt, best_metrics = _export_best_model(result, out)
    (out / METRICS_FILE).write_text(history_csv(history))
    plot_training_history(history, out / HISTORY_PLOT)
    summary: dict[str, Any] = {
        "run_dir": out.uri,
        "model": (out / MODEL_FILE).uri,
        "best_checkpoint": best_ckpt.path,
        "epochs": len(history),
        "stopped_early": len(history) < cfg.train.epochs,  # train.early_stop_patience ended it
        "best_val_acc": max(h["val_acc"] for h in history),
        "final_val_acc": history[-1]["val_acc"],
        **({"exported_weights": "ema" if best_metrics["ema_weights"] else "raw"}  # with train.ema_decay
           if "ema_weights" in best_metrics else {}),
        **{f"epochs_to_{round(share * 100)}pct_best": epochs_to_reach(history, share) for share in (0.95, 0.99)},
        "train_rows": ds["train_rows"],
        "trainable_params": history[-1].get("trainable_params"),
        "model_mb": round((out / MODEL_FILE).size() / 2**20, 3),
        "images_per_s": round(sum(h["images_per_s"] for h in history) / len(history), 1),
        "peak_rss_mb": max(h.get("peak_rss_mb", 0.0) for h in history),  # of one Train worker
        "peak_gpu_mb": max(h.get("peak_gpu_mb", 0.0) for h in history),
        "wall_s": round(wall_s, 2),
    }
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
    if report_test:
        summary.update(_test_report(cfg, ds, out))
        (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
    return {**summary, "history": history}


def _test_report(cfg: ExperimentConfig, ds: dict, out: Location) -> dict[str, Any]:
    from imgcls_dist.evaluate.split import evaluate_model_on_files

    try:
        rows = validate_files(ds["test_files"]) if ds["test_files"] else 0
        if not rows:
            print(f"note: {cfg.data.path} has no test rows: no test report", flush=True)
            return {}
        test = evaluate_model_on_files(out / MODEL_FILE, ds["test_files"], out, title=f"{cfg.run.name} test split")
    except Exception as e:  # noqa: BLE001 - the run's artifacts are all written: say why, keep the run
        reason = str(e) if isinstance(e, UserError) else root_cause(e)
        print(f"warning: no test report ({reason}); every other artifact is in {out}", file=sys.stderr, flush=True)
        return {"test_report_error": reason}
    print(f"test accuracy {test['accuracy']:.4f} (balanced {test['balanced_accuracy']:.4f}) on {test['rows']} rows "
          f"(report: {out / REPORT_TXT})", flush=True)
    return {"test_acc": test["accuracy"], "test_balanced_acc": test["balanced_accuracy"]}


def epochs_to_reach(history: list[dict], share: float) -> int:
    """Epochs trained until validation accuracy first reached `share` of the run's best (convergence speed)."""
    target = share * max(h["val_acc"] for h in history)
    return next(i for i, h in enumerate(history, 1) if h["val_acc"] >= target)


def history_csv(history: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=HISTORY_COLUMNS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for h in history:
        w.writerow({**h, "worker_samples": " ".join(str(x) for x in h.get("worker_samples", []))})
    return buf.getvalue()
