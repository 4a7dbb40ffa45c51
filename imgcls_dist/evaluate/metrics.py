"""Classification metrics (sklearn), calibration error, and the report files written beside a run or a
prediction set."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
from sklearn.metrics import accuracy_score, classification_report, confusion_matrix

from imgcls_dist.evaluate.files import CONFUSION_PLOT, METRICS_JSON, REPORT_TXT
from imgcls_dist.evaluate.plots import plot_confusion_matrix
from imgcls_dist.storage import PathLike, location


def write_classification_report(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str], out_dir: PathLike,
                                title: str = "", extra: dict | None = None) -> dict:
    """classification_report.txt, confusion_matrix.png and metrics.json into `out_dir` (any filesystem)."""
    out = location(out_dir)
    labels = list(range(len(classes)))
    report = classification_report(y_true, y_pred, labels=labels, target_names=classes, digits=4, zero_division=0)
    acc = float(accuracy_score(y_true, y_pred)) if len(y_true) else float("nan")
    cm = confusion_matrix(y_true, y_pred, labels=labels)
    recall = per_class_recall(cm, classes)
    balanced = float(np.mean(list(recall.values()))) if recall else float("nan")
    header = f"{title}\n" if title else ""
    (out / REPORT_TXT).write_text(
        f"{header}accuracy: {acc:.4f}, balanced accuracy: {balanced:.4f} on {len(y_true)} rows\n\n{report}")
    plot_confusion_matrix(cm, classes, out / CONFUSION_PLOT, title=f"{title or 'confusion matrix'} (acc {acc:.4f})")
    summary = {"accuracy": acc, "balanced_accuracy": balanced, "per_class_recall": recall, "rows": int(len(y_true)),
               **(extra or {})}
    (out / METRICS_JSON).write_text(json.dumps(summary, indent=2))
    return summary


def per_class_recall(cm: np.ndarray, classes: list[str]) -> dict[str, float]:
    """Recall of every class that has rows (a class without any has no recall, not 0). Their mean is
    sklearn's balanced_accuracy_score (mean recall over the classes present), which it does not break down."""
    support = cm.sum(axis=1)
    return {c: float(cm[i, i] / support[i]) for i, c in enumerate(classes) if support[i]}


# 15 equal-width confidence bins, as in Guo et al. (2017). Written here because sklearn has no multiclass
# ECE (sklearn.calibration.calibration_curve is binary and does not return the bin counts ECE weighs by).
ECE_BINS = 15


@dataclass
class ReliabilityBins:
    """Top-1 confidence histogram: per bin the row count, summed confidence and correct rows. Additive, so
    a prediction set is binned file by file."""

    count: np.ndarray
    confidence: np.ndarray
    correct: np.ndarray

    @classmethod
    def empty(cls, bins: int = ECE_BINS) -> ReliabilityBins:
        return cls(np.zeros(bins, np.int64), np.zeros(bins), np.zeros(bins))

    def add(self, probs: np.ndarray, labels: np.ndarray) -> ReliabilityBins:
        conf = probs.max(axis=1).astype(np.float64)
        idx = np.minimum((conf * len(self.count)).astype(np.int64), len(self.count) - 1)
        np.add.at(self.count, idx, 1)
        np.add.at(self.confidence, idx, conf)
        np.add.at(self.correct, idx, (probs.argmax(axis=1) == labels).astype(np.float64))
        return self

    def ece(self) -> float:
        """Expected calibration error: sum over bins of |accuracy - mean confidence| weighted by bin share."""
        n = self.count.sum()
        return float(np.abs(self.correct - self.confidence).sum() / n) if n else float("nan")

    def curve(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(mean confidence, accuracy, count) of the non-empty bins."""
        m = self.count > 0
        return self.confidence[m] / self.count[m], self.correct[m] / self.count[m], self.count[m]


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    return ReliabilityBins.empty(bins).add(probs, labels).ece()
