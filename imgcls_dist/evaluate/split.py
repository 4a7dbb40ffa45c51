"""Evaluate one exported model on labelled shards (the test-split report of a training run)."""

from __future__ import annotations

import numpy as np

from imgcls_dist.evaluate.metrics import write_classification_report
from imgcls_dist.storage import PathLike


def evaluate_model_on_files(model_path: PathLike, files: list[str], out_dir: PathLike, title: str = "") -> dict:
    labels, preds, classes, precision = predict_files(model_path, files)
    ok = labels >= 0  # undecodable rows carry -1 and are not scored
    # Recorded beside the scores: auto runs bf16 on CPUs with native bf16 and fp32 on others, so one model file
    # can score a hair differently on two machines.
    return write_classification_report(labels[ok], preds[ok], classes, out_dir, title=title,
                                       extra={"undecodable_rows": int((~ok).sum()), "precision": precision})


def predict_files(model_path: PathLike, files: list[str], batch_size: int = 256,
                  precision: str = "auto") -> tuple[np.ndarray, np.ndarray, list[str], str]:
    """(labels, predicted classes, classes, the precision the forward ran in) of a model file over labelled
    shards, through the same decode and predictor code as batch inference (no TTA, `precision` as --precision),
    streamed batch by batch: memory does not grow with the split. Undecodable rows get label -1."""
    from imgcls_dist.predictor.predictor import EnsemblePredictor
    from imgcls_dist.predictor.prepare import labelled_batches

    predictor = EnsemblePredictor([model_path], views="none", batch_size=batch_size, precision=precision)
    labels, preds = [], []
    for y, arrays in labelled_batches(files, predictor.input_keys, batch_size):
        labels.append(y)
        preds.append(predictor.predict_uint8(arrays).argmax(axis=1))
    if not labels:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), predictor.classes, predictor.precision
    return np.concatenate(labels), np.concatenate(preds), predictor.classes, predictor.precision
