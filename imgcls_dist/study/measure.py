"""What a study trial measures itself once its Train run has ended: clean training accuracy, single-image
latency, parameters, steps to converge and the LR of every step, on top of the run's summary.json."""

from __future__ import annotations

import time
from typing import Any, Sequence

import numpy as np
import torch

from imgcls_dist.models.checkpoint import MODEL_FILE
from imgcls_dist.predictor.predictor import EnsemblePredictor
from imgcls_dist.predictor.prepare import prepare_encoded
from imgcls_dist.storage import Location
from imgcls_dist.train.row_group import RowGroup
from imgcls_dist.train.stream import optimizer_steps, read_group

EVAL_BATCH = 256
LATENCY_WARMUP = 3


def clean_train_accuracy(predictor: EnsemblePredictor, groups: Sequence[RowGroup]) -> float | None:
    """Accuracy over the rows the run trained on, un-augmented (no TTA): the overfitting gap is this minus
    test accuracy. Training accuracy from the epochs themselves is measured on augmented, mixed batches."""
    correct = n = 0
    for group in groups:
        rows = read_group(group)
        for i in range(0, len(rows), EVAL_BATCH):
            chunk = rows[i:i + EVAL_BATCH]
            arrays, errors = prepare_encoded([img for _, img, _ in chunk], predictor.input_keys)
            pred = predictor.predict_uint8(arrays).argmax(axis=1)
            for (_, _, label), p, err in zip(chunk, pred, errors):
                if err is None and label >= 0:
                    correct += int(p == label)
                    n += 1
    return correct / n if n else None


def single_image_latency(predictor: EnsemblePredictor, encoded: bytes, repeats: int) -> dict[str, float]:
    """p50/p95 ms of one image from its encoded bytes to class probabilities (decode, resize, forward) at
    batch 1 on one CPU thread: a per-core figure, comparable across trials and machines whatever their core
    count. Other trials may be training on the node meanwhile; for quiet numbers run with tune.max_concurrent=1."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        times = []
        for i in range(LATENCY_WARMUP + repeats):
            t0 = time.perf_counter()
            arrays, _ = prepare_encoded([encoded], predictor.input_keys)
            predictor.predict_uint8(arrays)
            if i >= LATENCY_WARMUP:
                times.append((time.perf_counter() - t0) * 1000)
    finally:
        torch.set_num_threads(threads)
    return {"latency_p50_ms": float(np.percentile(times, 50)), "latency_p95_ms": float(np.percentile(times, 95))}


def steps_per_epoch(history: list[dict], batch_size: int, grad_accum: int) -> list[int]:
    """Optimizer steps of every epoch (one per grad_accum batches of one worker)."""
    return [optimizer_steps(h["train_samples"], h.get("world_size", 1), batch_size, grad_accum) for h in history]


def lr_curve(history: list[dict], steps: list[int]) -> list[float]:
    """The LR of every optimizer step. Schedules step once per epoch, so a step's LR is its epoch's."""
    return [h["lr"] for h, n in zip(history, steps) for _ in range(n)]


def steps_to(epochs: int | None, steps: list[int]) -> int | None:
    return sum(steps[:epochs]) if epochs is not None else None


def measure_run(run_dir: Location, summary: dict[str, Any], train_groups: Sequence[RowGroup], *,
                batch_size: int, grad_accum: int, latency_repeats: int) -> dict[str, Any]:
    """Every study metric of one finished run (`summary`: what `finalize_run` returned, history included)."""
    history = summary["history"]
    steps = steps_per_epoch(history, batch_size, grad_accum)
    # One model load serves both: a call with one image is a batch of 1, whatever the predictor's batch_size.
    predictor = EnsemblePredictor([run_dir / MODEL_FILE], views="none", device="cpu", batch_size=EVAL_BATCH)
    train_clean = clean_train_accuracy(predictor, train_groups)
    first_image = read_group(train_groups[0])[0][1]
    test = summary.get("test_acc")
    out = {k: summary.get(k) for k in (
        "test_acc", "test_balanced_acc", "best_val_acc", "final_val_acc", "epochs_to_95pct_best",
        "epochs_to_99pct_best", "wall_s", "images_per_s", "model_mb", "trainable_params", "peak_rss_mb",
        "peak_gpu_mb", "train_rows", "epochs")}
    out.update({
        "train_clean_acc": train_clean,
        "overfit_gap": train_clean - test if train_clean is not None and test is not None else None,
        "steps_to_95pct_best": steps_to(summary.get("epochs_to_95pct_best"), steps),
        "steps_to_99pct_best": steps_to(summary.get("epochs_to_99pct_best"), steps),
        "params": sum(p.numel() for p in predictor.members[0].model.parameters()),
        **single_image_latency(predictor, first_image, latency_repeats),
        "val_curve": [h["val_acc"] for h in history],
        "lr_curve": lr_curve(history, steps),
    })
    if test is None:
        out["test_error"] = summary.get("test_report_error", "the dataset has no test split")
    return out
