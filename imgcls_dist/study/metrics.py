"""What a study measures for every trial, and which direction is better: one list the trial, the report,
the statistics and the plots read."""

from __future__ import annotations

from dataclasses import dataclass

STUDY_METRICS_FILE = "study_metrics.json"  # what each trial measured, in its run directory


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    better: str | None  # "higher", "lower", or None (a description of the trial, not a result)
    fmt: str = ".4f"


METRICS: tuple[Metric, ...] = (
    Metric("test_acc", "test acc", "higher"),
    Metric("test_balanced_acc", "test balanced acc", "higher"),  # mean per-class recall
    Metric("best_val_acc", "best val acc", "higher"),
    Metric("final_val_acc", "final val acc", "higher"),
    Metric("train_clean_acc", "train acc (clean)", "higher"),
    # train-clean minus test: how much better the model does on what it trained on (overfitting)
    Metric("overfit_gap", "overfit gap", "lower"),
    Metric("epochs_to_95pct_best", "epochs to 95% best", "lower", ".1f"),
    Metric("epochs_to_99pct_best", "epochs to 99% best", "lower", ".1f"),
    Metric("steps_to_95pct_best", "steps to 95% best", "lower", ".0f"),
    Metric("steps_to_99pct_best", "steps to 99% best", "lower", ".0f"),
    Metric("wall_s", "train wall s", "lower", ".1f"),
    Metric("images_per_s", "train images/s", "higher", ".1f"),
    Metric("latency_p50_ms", "latency p50 ms", "lower", ".2f"),
    Metric("latency_p95_ms", "latency p95 ms", "lower", ".2f"),
    Metric("model_mb", "model MB", "lower", ".3f"),
    Metric("params", "params", "lower", ".0f"),
    Metric("trainable_params", "trainable params", None, ".0f"),
    Metric("peak_rss_mb", "peak RSS MB", "lower", ".0f"),
    Metric("peak_gpu_mb", "peak GPU MB", "lower", ".0f"),
    Metric("train_rows", "train rows", None, ".0f"),
    Metric("epochs", "epochs", None, ".0f"),
)
BY_KEY = {m.key: m for m in METRICS}
