"""Plots a person would rather look at than read: training curves and confusion matrices."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")  # headless: clusters and CI have no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from imgcls_dist.storage import Location, PathLike, location  # noqa: E402


def save_figure(fig, path: PathLike, dpi: int = 110) -> Location:
    """PNG to any filesystem (rendered in memory, written in one piece), and the figure closed."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    return location(path).write_bytes(buf.getvalue())


def plot_training_history(history: list[dict], path: PathLike) -> Location:
    epochs = [h["epoch"] + 1 for h in history]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    ax = axes[0]
    ax.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    ax.plot(epochs, [h["val_loss"] for h in history], "o-", label="val")
    # log scale: an early validation spike (BatchNorm stats still settling) would flatten everything else
    ax.set(title="loss", xlabel="epoch", yscale="log")
    ax.legend()
    ax = axes[1]
    ax.plot(epochs, [h["train_acc"] for h in history], "o-", label="train")
    ax.plot(epochs, [h["val_acc"] for h in history], "o-", label="val")
    ax.set(title="accuracy", xlabel="epoch", ylim=(0, 1.01))
    ax.legend()
    ax = axes[2]
    ax.plot(epochs, [h["lr"] for h in history], "o-", color="tab:green")
    ax.set(title="learning rate (head group)", xlabel="epoch")
    sizes = [h.get("image_size") for h in history]
    if len(set(sizes)) > 1:  # progressive resizing: mark where the input size changed
        for i in range(1, len(sizes)):
            if sizes[i] != sizes[i - 1]:
                for a in axes:
                    a.axvline(epochs[i], color="gray", ls=":", lw=1)
                axes[0].annotate(f"{sizes[i]}px", (epochs[i], axes[0].get_ylim()[1]), fontsize=8, va="top")
    fig.tight_layout()
    return save_figure(fig, path)


def plot_confusion_matrix(cm: np.ndarray, classes: list[str], path: PathLike, title: str = "confusion matrix") -> Location:
    n = len(classes)
    fig, ax = plt.subplots(figsize=(max(5, 0.5 * n + 2), max(4, 0.5 * n + 1.5)))
    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, label="fraction of true class")
    ax.set(xticks=range(n), yticks=range(n), xticklabels=classes, yticklabels=classes, xlabel="predicted",
           ylabel="true", title=title)
    if n <= 30:
        for i in range(n):
            for j in range(n):
                if cm[i, j]:
                    ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if norm[i, j] > 0.5 else "black")
    fig.tight_layout()
    return save_figure(fig, path)


def plot_reliability(curves: dict[str, tuple[np.ndarray, np.ndarray, float]], path: PathLike,
                     title: str = "reliability") -> Location:
    """Reliability diagram: accuracy against mean top-1 confidence per bin, one line per prediction set
    ({name: (confidence, accuracy, ece)}); the diagonal is perfect calibration."""
    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.plot([0, 1], [0, 1], ls="--", color="gray", lw=1, label="perfect calibration")
    for name, (conf, acc, ece) in curves.items():
        ax.plot(conf, acc, "o-", ms=4, label=f"{name} (ECE {ece:.4f})")
    ax.set(xlabel="mean confidence (top-1)", ylabel="accuracy", xlim=(0, 1.01), ylim=(0, 1.01), title=title)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    return save_figure(fig, path)
