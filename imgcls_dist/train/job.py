"""Driver side of `imgcls-dist train`: validate, size the run, launch the TorchTrainer, write reports."""

from __future__ import annotations

import csv
import json
import shutil
import time
from pathlib import Path
from typing import Any

from imgcls_dist.config import ExperimentConfig, write_config
from imgcls_dist.data.augment import hflip_allowed
from imgcls_dist.data.schema import validate_dataset
from imgcls_dist.errors import JobFailed, UserError, root_cause
from imgcls_dist.models.registry import get_spec

HISTORY_COLUMNS = ["epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "images_per_s", "image_size",
                   "train_samples", "unique_samples", "worker_samples", "skipped_rows", "nonfinite_steps"]


def resolve_dataset(cfg: ExperimentConfig) -> dict[str, Any]:
    """Everything the workers need to know about the data, checked before any Ray work starts."""
    meta = validate_dataset(cfg.data.path, splits=("train", "val"))
    spec = get_spec(cfg.model.arch)
    image_size = cfg.data.image_size or meta.get("image_size") or spec.default_size
    for where, size in [("data.image_size", image_size)] + [
        ("train.progressive_resizing", s) for _, s in cfg.train.progressive_resizing
    ]:
        if size < spec.min_size:
            raise UserError(f"{where}: {size}px is below {cfg.model.arch}'s minimum input size {spec.min_size}px")
    test_dir = Path(cfg.data.path) / "test"
    return {
        "classes": meta["classes"],
        "image_size": int(image_size),
        "hflip": cfg.augment.hflip if cfg.augment.hflip is not None else hflip_allowed(meta),
        "train_files": [str(Path(f).resolve()) for f in meta["files"]["train"]],
        "val_files": [str(Path(f).resolve()) for f in meta["files"]["val"]],
        "test_files": [str(f.resolve()) for f in sorted(test_dir.glob("*.parquet"))] if test_dir.is_dir() else [],
    }


def resolve_scaling(cfg: ExperimentConfig) -> tuple[int, bool]:
    """Workers that fit the cluster: asking for more than it holds would make Train wait forever."""
    from imgcls_dist.ray_utils import cluster_cpus, cluster_gpus

    cpus, gpus = cluster_cpus(), cluster_gpus()
    use_gpu = cfg.scaling.use_gpu if cfg.scaling.use_gpu is not None else gpus > 0
    if use_gpu and gpus == 0:
        raise UserError("scaling.use_gpu: true but the Ray cluster has no GPUs")
    fit = int(gpus) if use_gpu else int(cpus // cfg.scaling.cpus_per_worker)
    n = cfg.scaling.num_workers or max(1, fit)
    if n * cfg.scaling.cpus_per_worker > cpus:
        raise UserError(f"scaling.num_workers: {n} workers x {cfg.scaling.cpus_per_worker} CPU exceed the cluster's "
                        f"{cpus:g} CPUs (the run would wait forever)")
    return n, use_gpu


def _is_uri(path: str) -> bool:
    return "://" in path


def run_dir_for(cfg: ExperimentConfig) -> tuple[str, Path]:
    """(storage path as Ray wants it, local directory for this run's reports)."""
    storage = cfg.run.storage_path if _is_uri(cfg.run.storage_path) else str(Path(cfg.run.storage_path).resolve())
    # Reports land beside the checkpoints for local storage; object-store runs keep them in ./runs/<name>.
    out_dir = Path(storage) / cfg.run.name if not _is_uri(storage) else Path("runs") / cfg.run.name
    return storage, out_dir


def build_trainer(cfg: ExperimentConfig, ds: dict[str, Any], num_workers: int, use_gpu: bool, *,
                  fault: dict | None = None, callbacks: list | None = None):
    """The TorchTrainer for one run (also what each Tune trial launches)."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from imgcls_dist.train.loop import train_loop_per_worker

    storage, out_dir = run_dir_for(cfg)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "experiment": cfg.to_dict(),
            "dataset": ds,
            "use_gpu": use_gpu,
            "fault": fault,
            "tensorboard_dir": str(out_dir / "tensorboard") if cfg.run.tensorboard and not _is_uri(storage) else None,
        },
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cfg.scaling.cpus_per_worker}),
        run_config=RunConfig(
            name=cfg.run.name,
            storage_path=storage,
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


def run_training(cfg: ExperimentConfig, *, fault: dict | None = None, report_test: bool = True) -> dict[str, Any]:
    from imgcls_dist.ray_utils import ensure_ray

    ds = resolve_dataset(cfg)
    ensure_ray()
    num_workers, use_gpu = resolve_scaling(cfg)
    _, out_dir = run_dir_for(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_config(cfg, out_dir / "config.yaml")
    print(f"training {cfg.model.arch} on {cfg.data.path}: {num_workers} worker(s), "
          f"{'GPU' if use_gpu else 'CPU'}, {cfg.train.epochs} epochs, image {ds['image_size']}px -> {out_dir}", flush=True)
    t0 = time.perf_counter()
    result = fit(build_trainer(cfg, ds, num_workers, use_gpu, fault=fault))
    return finalize_run(result, cfg, ds, out_dir, time.perf_counter() - t0, report_test=report_test)


def finalize_run(result, cfg: ExperimentConfig, ds: dict, out_dir: Path, wall_s: float,
                 report_test: bool = True) -> dict[str, Any]:
    from imgcls_dist.evaluate.plots import plot_training_history
    from imgcls_dist.train.state import load_history

    if result.checkpoint is None:
        raise JobFailed("training produced no checkpoint")
    with result.checkpoint.as_directory() as d:
        history = load_history(d)
    best_ckpt = result.get_best_checkpoint("val_acc", "max") or result.checkpoint
    with best_ckpt.as_directory() as d:
        shutil.copy2(Path(d) / "model.pt", out_dir / "model.pt")
    write_history_csv(history, out_dir / "metrics.csv")
    plot_training_history(history, out_dir / "training_history.png")
    summary: dict[str, Any] = {
        "run_dir": str(out_dir),
        "model": str(out_dir / "model.pt"),
        "best_checkpoint": best_ckpt.path,
        "epochs": len(history),
        "best_val_acc": max(h["val_acc"] for h in history),
        "final_val_acc": history[-1]["val_acc"],
        "wall_s": round(wall_s, 2),
        "history": history,
    }
    if report_test and ds["test_files"]:
        from imgcls_dist.evaluate.split import evaluate_model_on_files

        test = evaluate_model_on_files(out_dir / "model.pt", ds["test_files"], out_dir, title=f"{cfg.run.name} test split")
        summary["test_acc"] = test["accuracy"]
        print(f"test accuracy {test['accuracy']:.4f} on {test['rows']} rows "
              f"(report: {out_dir / 'classification_report.txt'})", flush=True)
    (out_dir / "summary.json").write_text(json.dumps({k: v for k, v in summary.items() if k != "history"}, indent=2))
    return summary


def write_history_csv(history: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=HISTORY_COLUMNS, extrasaction="ignore")
        w.writeheader()
        for h in history:
            w.writerow({**h, "worker_samples": " ".join(str(x) for x in h.get("worker_samples", []))})
