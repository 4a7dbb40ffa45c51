"""Top-k classes for local image files: the batch job's decode, resize, TTA and ensemble, without Ray."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from imgcls_dist.errors import UserError
from imgcls_dist.predictor.manifest import print_spread_note, resolve_ensemble
from imgcls_dist.predictor.predictor import EnsemblePredictor
from imgcls_dist.predictor.prepare import prepare_file


def load_predictor(
    models: str | Path | Sequence[str | Path],
    *,
    tta: str | Sequence[str] | None = None,
    weights: Sequence[float] | None = None,
    combine: str | None = None,
    device: str | None = None,
    batch_size: int = 64,
    precision: str = "auto",
    backend: str = "auto",
    calibration: str | Path | None = None,
) -> EnsemblePredictor:
    """--models (ensemble.json or model files/dirs) -> predictor; explicit weights/combine override the manifest's,
    --tta its views; its temperatures always apply. `precision`, `backend`, `calibration`: --precision, --backend
    and --calibration (predictor/precision.py, predictor/backend.py, EnsemblePredictor)."""
    spec = resolve_ensemble(models, weights, combine)
    predictor = EnsemblePredictor.from_spec(spec, views=tta, device=device, batch_size=batch_size,
                                            precision=precision, backend=backend, calibration=calibration)
    print_spread_note(spec, predictor.describe())
    return predictor


def predict_with(predictor: EnsemblePredictor, images: Sequence[str | Path], topk: int = 5) -> list[dict[str, Any]]:
    """[{"path", "top": [{"class", "index", "prob"}, ...]}] per image, in input order."""
    if topk < 1:
        raise UserError(f"--topk: must be >= 1, got {topk}")
    k = min(topk, len(predictor.classes))
    results = []
    for start in range(0, len(images), predictor.batch_size):
        chunk = list(images[start : start + predictor.batch_size])
        per_image = [prepare_file(p, predictor.input_keys) for p in chunk]
        batch = {key: np.stack([r[key] for r in per_image]) for key in predictor.input_keys}
        probs = predictor.predict_uint8(batch)
        for path, p in zip(chunk, probs):
            results.append({"path": str(path), "top": top_classes(p, predictor.classes, k)})
    return results


def top_classes(probs: np.ndarray, classes: Sequence[str], k: int) -> list[dict[str, Any]]:
    """The k most probable classes of one image, most probable first (ties: lower index first)."""
    order = np.argsort(-probs, kind="stable")[:k]
    return [{"class": classes[i], "index": int(i), "prob": float(probs[i])} for i in order]


def predict_images(
    images: Sequence[str | Path],
    models: str | Path | Sequence[str | Path],
    *,
    topk: int = 5,
    tta: str | Sequence[str] | None = None,
    weights: Sequence[float] | None = None,
    combine: str | None = None,
    device: str | None = None,
    precision: str = "auto",
    backend: str = "auto",
    calibration: str | Path | None = None,
) -> list[dict[str, Any]]:
    if not images:
        raise UserError("predict: give at least one image file")
    predictor = load_predictor(models, tta=tta, weights=weights, combine=combine, device=device, precision=precision,
                               backend=backend, calibration=calibration)
    return predict_with(predictor, images, topk)


def format_predictions(results: list[dict[str, Any]]) -> str:
    return "\n".join(
        f"{r['path']}: " + ", ".join(f"{t['class']} {t['prob']:.4f}" for t in r["top"]) for r in results
    )
