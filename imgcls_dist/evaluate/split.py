"""Evaluate one exported model on labelled shards (the test-split report of a training run)."""

from __future__ import annotations

import numpy as np

from imgcls_dist.evaluate.metrics import write_classification_report
from imgcls_dist.storage import PathLike


def evaluate_model_on_files(model_path: PathLike, files: list[str], out_dir: PathLike, title: str = "") -> dict:
    labels, probs, classes = predict_files(model_path, files)
    ok = labels >= 0  # undecodable rows carry -1 and are not scored
    return write_classification_report(labels[ok], probs[ok].argmax(1), classes, out_dir, title=title,
                                       extra={"undecodable_rows": int((~ok).sum())})


def predict_files(model_path: PathLike, files: list[str], batch_size: int = 256) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(labels, probs, classes) of a model file over labelled shards, single process, through the same decode
    and predictor code as batch inference (no TTA). Undecodable rows get label -1."""
    from imgcls_dist.data.shards import read_rows
    from imgcls_dist.infer.prepare import prepare_encoded
    from imgcls_dist.infer.predictor import EnsemblePredictor

    predictor = EnsemblePredictor([model_path], views="none", batch_size=batch_size)
    rows = read_rows(files)
    arrays, errors = prepare_encoded(rows.images, predictor.input_keys)
    labels = rows.labels.copy()
    labels[np.array([e is not None for e in errors], dtype=bool)] = -1
    return labels, predictor.predict_uint8(arrays), predictor.classes
