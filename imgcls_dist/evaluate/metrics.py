"""Classification metrics (sklearn) and the report files written beside a run or a prediction set."""

from __future__ import annotations

import json

import numpy as np
from sklearn.metrics import accuracy_score, classification_report, confusion_matrix

from imgcls_dist.evaluate.plots import plot_confusion_matrix
from imgcls_dist.storage import PathLike, location


def write_classification_report(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str], out_dir: PathLike,
                                title: str = "", extra: dict | None = None) -> dict:
    """classification_report.txt, confusion_matrix.png and metrics.json into `out_dir` (any filesystem)."""
    out = location(out_dir)
    labels = list(range(len(classes)))
    report = classification_report(y_true, y_pred, labels=labels, target_names=classes, digits=4, zero_division=0)
    acc = float(accuracy_score(y_true, y_pred)) if len(y_true) else float("nan")
    header = f"{title}\n" if title else ""
    (out / "classification_report.txt").write_text(f"{header}accuracy: {acc:.4f} on {len(y_true)} rows\n\n{report}")
    cm = confusion_matrix(y_true, y_pred, labels=labels)
    plot_confusion_matrix(cm, classes, out / "confusion_matrix.png", title=f"{title or 'confusion matrix'} (acc {acc:.4f})")
    summary = {"accuracy": acc, "rows": int(len(y_true)), **(extra or {})}
    (out / "metrics.json").write_text(json.dumps(summary, indent=2))
    return summary
