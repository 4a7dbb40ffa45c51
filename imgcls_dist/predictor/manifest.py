"""The ensemble manifest (`ensemble.json`): what batch inference, `predict` and serving read.

Format (every key but `models[].path` optional):

    {"models": [{"path": "models/a/model.pt", "weight": 0.75, "temperature": 1.4, "name": "a", ...}, ...],
     "combine": "weighted", "views": ["identity", "shift_left"], "weight_rule": "...", "validation": {...}}

A member path is a URI, an absolute path, or relative to the manifest's directory. `temperature` divides a
member's logits before its softmax (fitted on validation data by `ensemble build`); `views` are the TTA
views the builder chose, used unless the user passes --tta.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

from imgcls_dist.errors import UserError
from imgcls_dist.models.checkpoint import MODEL_FILE, resolve_model_path
from imgcls_dist.predictor.options import COMBINES, VIEW_NAMES
from imgcls_dist.storage import PathLike, is_uri, location
from imgcls_dist.tracking.registry import fetch_model, is_registry_uri

ENSEMBLE_FILE = "ensemble.json"
# `--models A B` without a manifest: members whose validation accuracies (in their model files) differ by
# more than this get a one-line pointer to `ensemble build` (a plain mean lets a weak member pull a strong
# one down: docs/benchmarks.md, "Ensembles built on validation data").
SPREAD_NOTE_ACC = 0.02


@dataclass(frozen=True)
class EnsembleSpec:
    paths: list[str]
    weights: list[float] | None = None
    combine: str | None = None
    temperatures: list[float] | None = None
    views: list[str] | None = None
    manifest: str | None = None  # the ensemble.json it came from, if any


def resolve_combine(combine: str | None, weights: Sequence[float] | None) -> str:
    """None -> "weighted" when weights are given, else "mean"."""
    if combine is None:
        return "weighted" if weights is not None else "mean"
    if combine not in COMBINES:
        raise UserError(f"--combine: unknown method {combine!r}; valid: {', '.join(COMBINES)}")
    if combine == "mean" and weights is not None:
        raise UserError("--combine mean ignores weights; use --combine weighted (or vote) with --weights")
    if combine == "weighted" and weights is None:
        raise UserError("--combine weighted needs --weights (or an ensemble.json with a weight per model)")
    return combine


def _numbers(p, entries: list[dict], key: str, positive: bool = False) -> list[float] | None:
    values = [e.get(key) for e in entries]
    given = [v is not None for v in values]
    if not any(given):
        return None
    if not all(given):
        raise UserError(f"{p}: either every model has a '{key}' or none does")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values):
        raise UserError(f"{p}: every '{key}' must be a finite number")
    if positive and any(v <= 0 for v in values):
        raise UserError(f"{p}: every '{key}' must be > 0")
    return [float(v) for v in values]


def load_ensemble_manifest(path: PathLike) -> EnsembleSpec:
    """ensemble.json (any filesystem) -> EnsembleSpec (format: docs/design.md, "Ensemble manifest")."""
    p = location(path)
    doc = p.read_json()
    entries = doc.get("models") if isinstance(doc, dict) else None
    if not isinstance(entries, list) or not entries:
        raise UserError(f"{p}: 'models' must be a non-empty list of {{\"path\": ...}} entries")
    paths = []
    for i, e in enumerate(entries):
        if not isinstance(e, dict) or not isinstance(e.get("path"), str):
            raise UserError(f"{p}: models[{i}] must be an object with a string 'path'")
        mp = e["path"]
        paths.append(mp if is_uri(mp) or Path(mp).is_absolute() else (p.parent / mp).uri)
    weights = _numbers(p, entries, "weight")
    if weights is not None and any(w < 0 for w in weights):
        raise UserError(f"{p}: every 'weight' must be >= 0")
    temperatures = _numbers(p, entries, "temperature", positive=True)
    # views and combine checked here too, so that a bad value names this file rather than --tta or --combine
    views = doc.get("views")
    if views is not None and (not isinstance(views, list) or not views
                              or not all(isinstance(v, str) and v.strip().lower() in VIEW_NAMES for v in views)):
        raise UserError(f"{p}: 'views' must be a non-empty list of view names ({', '.join(VIEW_NAMES)})")
    if doc.get("combine") is not None and doc["combine"] not in COMBINES:
        raise UserError(f"{p}: 'combine' must be one of {', '.join(COMBINES)}")
    combine = resolve_combine(doc.get("combine"), weights)
    return EnsembleSpec(paths, None if combine == "mean" else weights, combine, temperatures, views, p.uri)


def as_list(models: PathLike | Sequence[PathLike]) -> list[PathLike]:
    """--models as given to the library: one path, or several."""
    return [models] if isinstance(models, (str, os.PathLike)) else list(models)


def registered_as_paths(models: PathLike | Sequence[PathLike]) -> list[PathLike]:
    """--models with each `models:/...` URI replaced by the path of its files (downloaded once); anything else as
    it is. MLflow is imported only for such a URI (tracking/registry.py): it is an optional extra."""
    return [fetch_model(m) if is_registry_uri(m) else m for m in as_list(models)]


def resolve_model_args(models: PathLike | Sequence[PathLike]) -> EnsembleSpec:
    """CLI --models values (any filesystem, or registered models: `models:/NAME/VERSION`, `models:/NAME@ALIAS`)
    -> EnsembleSpec. One ensemble.json (or a directory holding one and no model.pt) is read as a manifest; anything
    else is a list of model files/dirs."""
    items = registered_as_paths(models)
    if not items:
        raise UserError("--models: give one ensemble.json or at least one model file/directory")
    if len(items) == 1:
        p = location(items[0])
        if p.suffix == ".json":
            return load_ensemble_manifest(p)
        if p.is_dir() and not (p / MODEL_FILE).exists() and (p / ENSEMBLE_FILE).is_file():
            return load_ensemble_manifest(p / ENSEMBLE_FILE)
    jsons = [str(x) for x in items if str(x).endswith(".json")]
    if jsons:
        raise UserError(f"--models: an ensemble manifest must be the only --models value, "
                        f"got {jsons[0]} among {len(items)}")
    return EnsembleSpec([resolve_model_path(x).uri for x in items])


def resolve_ensemble(models: PathLike | Sequence[PathLike], weights: Sequence[float] | None = None,
                     combine: str | None = None) -> EnsembleSpec:
    """--models/--weights/--combine -> EnsembleSpec. Explicit weights replace a manifest's; an explicit
    --combine mean drops the manifest's weights (plain average). Temperatures and views stay."""
    spec = resolve_model_args(models)
    if weights is None and combine != "mean":
        return replace(spec, combine=combine if combine is not None else spec.combine)
    return replace(spec, weights=list(weights) if weights is not None else None, combine=combine)


def spread_note(spec: EnsembleSpec, members: Sequence[dict[str, Any]]) -> str | None:
    """One line when a manifest-less ensemble mixes members whose validation accuracies differ by more than
    SPREAD_NOTE_ACC (`members`: EnsemblePredictor.describe())."""
    if spec.manifest is not None or len(members) < 2:
        return None
    accs = [m.get("metrics", {}).get("val_acc") for m in members]
    known = [(a, m["path"]) for a, m in zip(accs, members) if isinstance(a, (int, float)) and a >= 0]
    if len(known) < 2:
        return None
    (lo, lo_path), (hi, hi_path) = min(known), max(known)
    if hi - lo <= SPREAD_NOTE_ACC:
        return None
    return (f"note: members' validation accuracies differ by {100 * (hi - lo):.1f} points ({hi:.4f} {hi_path} vs "
            f"{lo:.4f} {lo_path}); a plain mean can lose to the best member: fit weights, temperatures and views "
            f"on validation data with `imgcls-dist ensemble build`")


def print_spread_note(spec: EnsembleSpec, members: Sequence[dict[str, Any]]) -> None:
    note = spread_note(spec, members)
    if note:
        print(note, file=sys.stderr)
