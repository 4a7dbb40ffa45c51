"""Evaluate one exported model on labelled shards (the test-split report of a training run)."""

from __future__ import annotations

import numpy as np

from imgcls_dist.evaluate.metrics import write_classification_report
from imgcls_dist.storage import PathLike


def evaluate_model_on_files(model_path: PathLike, files: list[str], out_dir: PathLike, title: str = "") -> dict:
    labels, preds, classes = predict_files(model_path, files)
    ok = labels >= 0  # undecodable rows carry -1 and are not scored
    return write_classification_report(labels[ok], preds[ok], classes, out_dir, title=title,
                                       extra={"undecodable_rows": int((~ok).sum())})


def predict_files(model_path: PathLike, files: list[str], batch_size: int = 256) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(labels, predicted classes, classes) of a model file over labelled shards, through the same decode and
    predictor code as batch inference (no TTA), streamed batch by batch: memory does not grow with the split.
    Undecodable rows get label -1."""
    from imgcls_dist.predictor.predictor import EnsemblePredictor
    from imgcls_dist.predictor.prepare import labelled_batches

    predictor = EnsemblePredictor([model_path], views="none", batch_size=batch_size)
    labels, preds = [], []
    for y, arrays in labelled_batches(files, predictor.input_keys, batch_size):
        labels.append(y)
        preds.append(predictor.predict_uint8(arrays).argmax(axis=1))
    if not labels:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), predictor.classes
    return np.concatenate(labels), np.concatenate(preds), predictor.classes
