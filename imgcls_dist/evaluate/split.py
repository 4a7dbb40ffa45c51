"""Evaluate one exported model on labelled shards (the test-split report of a training run)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from imgcls_dist.evaluate.metrics import write_classification_report
from imgcls_dist.models.checkpoint import load_model_file


def evaluate_model_on_files(model_path: str | Path, files: list[str], out_dir: str | Path, title: str = "") -> dict:
    classes = load_model_file(model_path)["classes"]
    labels, probs = predict_files(model_path, files)
    ok = labels >= 0  # undecodable rows carry -1 and are not scored
    return write_classification_report(labels[ok], probs[ok].argmax(1), classes, out_dir, title=title,
                                       extra={"undecodable_rows": int((~ok).sum())})


def predict_files(model_path: str | Path, files: list[str], batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """(labels, probs) of a model file over labelled shards, single process (for the test-split report)."""
    from imgcls_dist.data.shards import read_rows
    from imgcls_dist.models.checkpoint import build_model_from_file
    from imgcls_dist.models.preprocess import normalize
    from imgcls_dist.train.data import make_eval_loader

    model, meta = build_model_from_file(model_path)
    rows = read_rows([Path(f) for f in files])
    loader = make_eval_loader(rows, channels=meta["in_channels"], image_size=meta["image_size"],
                              batch_size=batch_size, loader_workers=0)
    labels, probs = [], []
    with torch.inference_mode():
        for images, y, _ in loader:
            probs.append(torch.softmax(model(normalize(images, meta["mean"], meta["std"])), 1).numpy())
            labels.append(y.numpy())
    return np.concatenate(labels), np.concatenate(probs)
