"""`imgcls-dist ensemble build`: an ensemble fitted on the validation split, written as ensemble.json.

`build_ensemble`: every candidate's validation logits per TTA view, a temperature per candidate, members and
views by greedy forward selection on validation log-loss, then ensemble.json, a reliability diagram and a table.
Never the test split. Design: docs/design.md, "Building an ensemble"; the file: docs/design.md,
"Ensemble manifest".
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from typing import Any, Sequence

import numpy as np

from imgcls_dist.data.schema import list_parquet, read_dataset_meta, split_files
from imgcls_dist.ensemble.calibrate import choose_temperature, softmax
from imgcls_dist.predictor.manifest import ENSEMBLE_FILE, resolve_model_args
from imgcls_dist.ensemble.select import accuracy, log_loss, select_members, select_views
from imgcls_dist.errors import UserError
from imgcls_dist.evaluate.metrics import ReliabilityBins
from imgcls_dist.evaluate.plots import plot_reliability
from imgcls_dist.predictor.predictor import EnsemblePredictor
from imgcls_dist.predictor.prepare import labelled_batches
from imgcls_dist.predictor.tta import default_views
from imgcls_dist.models.checkpoint import MODEL_FILE
from imgcls_dist.storage import Location, PathLike, location
from imgcls_dist.predictor.options import BATCH_SIZE
from imgcls_dist.table import format_table

CALIBRATION_PLOT = "ensemble_calibration.png"
RULE = ("greedy forward selection with replacement on validation log-loss (Caruana et al., 2004), members "
        "temperature-scaled (Guo et al., 2017); weight = times picked / steps; a step is taken only if it "
        "lowers log-loss without lowering accuracy")


def candidate_paths(models: PathLike | Sequence[PathLike]) -> list[str]:
    """--models: model files/dirs, one ensemble.json (its members), or a tune campaign directory (every
    model it exported under models/)."""
    items = [models] if isinstance(models, (str, bytes)) or not isinstance(models, Sequence) else list(models)
    if len(items) == 1:
        d = location(items[0])
        if d.is_dir() and not (d / MODEL_FILE).exists() and (d / "models").is_dir():
            found = sorted((m / MODEL_FILE for m in (d / "models").iterdir() if (m / MODEL_FILE).is_file()),
                           key=lambda f: f.uri)
            if not found:
                raise UserError(f"{d}/models: no exported {MODEL_FILE} to build an ensemble from")
            return [f.uri for f in found]
    return resolve_model_args(items).paths


def validation_files(val: PathLike) -> tuple[list[Location], list[str] | None]:
    """A dataset directory (its val/ split and classes) or labelled shards (a file, directory or glob)."""
    loc = location(val)
    if loc.is_dir() and (loc / "dataset.json").is_file():
        return split_files(loc, "val"), list(read_dataset_meta(loc)["classes"])
    files = list_parquet(val)
    if not files:
        raise UserError(f"--val: {val}: no .parquet files")
    return files, None


def _member_names(paths: list[str]) -> list[str]:
    names = []
    for p in paths:
        loc = location(p)
        base = loc.parent.name if loc.name == MODEL_FILE else loc.stem
        names.append(base if base not in names else f"{base}-{len(names)}")
    return names


def collect_logits(predictors: list[EnsemblePredictor], files: list[Location], batch_size: int,
                   max_rows: int | None, say) -> tuple[list[np.ndarray], np.ndarray]:
    """Per candidate [views, rows, classes] logits over the validation rows that decode, and their labels."""
    keys = sorted({k for p in predictors for k in p.input_keys})
    parts: list[list[np.ndarray]] = [[] for _ in predictors]
    labels, t0, last = [], time.monotonic(), time.monotonic()
    for y, arrays in labelled_batches(files, keys, batch_size, max_rows):
        ok = y >= 0
        if not ok.any():
            continue
        arrays = {k: a[ok] for k, a in arrays.items()}
        for part, p in zip(parts, predictors):
            part.append(p.view_logits(arrays)[0])
        labels.append(y[ok])
        if time.monotonic() - last > 30:
            last = time.monotonic()
            say(f"ensemble build: {sum(map(len, labels))} validation rows predicted, {last - t0:.0f}s")
    if not labels:
        raise UserError(f"{files[0].parent}: no decodable labelled validation rows")
    return [np.concatenate(p, axis=1) for p in parts], np.concatenate(labels)


def _scores(probs: np.ndarray, y: np.ndarray) -> dict[str, float]:
    return {"acc": round(accuracy(probs, y), 6), "nll": round(log_loss(probs, y), 6),
            "ece": round(ReliabilityBins.empty().add(probs, y).ece(), 6)}


def _relative(path: str, root: Location) -> str:
    base = root.uri.rstrip("/") + "/"
    return path[len(base):] if path.startswith(base) else path


def manifest_location(out: PathLike) -> Location:
    """--out: a .json path, or a directory to hold ensemble.json."""
    out_loc = location(out)
    return out_loc if out_loc.suffix == ".json" else out_loc / ENSEMBLE_FILE


def build_ensemble(models: PathLike | Sequence[PathLike], val: PathLike, out: PathLike, *, batch_size: int = BATCH_SIZE,
                   max_rows: int | None = None, precision: str = "auto", verbose: bool = True) -> dict[str, Any]:
    """Fit temperatures, choose members and views on `val`; write ensemble.json to `out` (a .json path, or a
    directory to hold ensemble.json). Returns the manifest. `precision` (--precision): the validation logits
    are computed in it, so temperatures fit the logits inference computes with the same setting on the same
    hardware; the manifest records it (validation.precision)."""
    say = print if verbose else (lambda *a, **k: None)
    manifest_path = manifest_location(out)
    manifest_path.parent.check_writable()
    paths = candidate_paths(models)
    files, classes = validation_files(val)
    # Each candidate with its own training views (the ensemble's candidate views come after selection).
    predictors = [EnsemblePredictor([p], batch_size=batch_size, precision=precision) for p in paths]
    names = _member_names(paths)
    for p, name in zip(predictors, names):
        if p.classes != predictors[0].classes:
            raise UserError(f"{paths[names.index(name)]}: classes differ from {paths[0]}")
    if classes is not None and classes != predictors[0].classes:
        raise UserError(f"{val}: dataset classes differ from the models' classes")
    say(f"ensemble build: {len(paths)} candidate(s) on {val}, {predictors[0].precision_choice} -> {manifest_path}",
        flush=True)
    logits, y = collect_logits(predictors, files, batch_size, max_rows, say)
    if y.max() >= len(predictors[0].classes):
        raise UserError(f"{val}: label {int(y.max())} outside the models' {len(predictors[0].classes)} classes")

    fits = [choose_temperature(lg[0], y) for lg in logits]  # view 0 is identity (training_views order)
    temps = [t for t, _ in fits]
    raw = [softmax(lg[0]) for lg in logits]
    calibrated = [softmax(lg[0], t) for lg, t in zip(logits, temps)]
    counts, member_steps = select_members(np.stack(calibrated), y, names)
    chosen = [i for i, c in enumerate(counts) if c]
    weights = [counts[i] / sum(counts) for i in chosen]
    candidates_views = default_views([predictors[i].members[0].meta for i in chosen])
    per_view = {}
    for v in candidates_views:
        per_view[v] = sum(w * softmax(logits[i][predictors[i].views.index(v)], temps[i])
                          for i, w in zip(chosen, weights))
    views, view_steps = select_views(per_view, y, candidates_views)
    result = sum(per_view[v] for v in views) / len(views)

    cand_rows = []
    for i, name in enumerate(names):
        cand_rows.append({"name": name, "path": paths[i], "temperature": round(temps[i], 4),
                          "temperature_fit": fits[i][1],
                          "weight": round(counts[i] / sum(counts), 6), **_scores(raw[i], y),
                          **{f"{k}_calibrated": v for k, v in _scores(calibrated[i], y).items()}})
    validation = {
        "split": ",".join(f.uri for f in files[:3]) + (f",... ({len(files)} files)" if len(files) > 3 else ""),
        "rows": int(len(y)), "precision": predictors[0].precision, "candidates": cand_rows,
        "plain_mean": _scores(sum(raw) / len(raw), y),
        "selected_no_tta": _scores(per_view["identity"], y),
        "result": _scores(result, y),
        "member_steps": [asdict(s) for s in member_steps], "view_steps": [asdict(s) for s in view_steps],
        "candidate_views": candidates_views,
    }
    root = manifest_path.parent
    doc = {
        "models": [{"path": _relative(paths[i], root), "name": names[i], "weight": w, "temperature": temps[i],
                    "val_acc": cand_rows[i]["acc"], "val_nll_calibrated": cand_rows[i]["nll_calibrated"]}
                   for i, w in zip(chosen, weights)],
        "combine": "weighted", "views": views, "weight_rule": RULE, "validation": validation,
    }
    manifest_path.write_text(json.dumps(doc, indent=2) + "\n")
    _plot(raw, calibrated, result, names, y, root / CALIBRATION_PLOT)
    say(format_build_table(doc))
    say(f"ensemble build: wrote {manifest_path} and {root / CALIBRATION_PLOT}")
    return doc


def _plot(raw: list[np.ndarray], calibrated: list[np.ndarray], result: np.ndarray, names: list[str], y: np.ndarray,
          path: Location) -> None:
    curves = {}
    for name, r, c in zip(names, raw, calibrated):
        for label, p in ((f"{name}", r), (f"{name}, T-scaled", c)):
            b = ReliabilityBins.empty().add(p, y)
            curves[label] = (*b.curve()[:2], b.ece())
    b = ReliabilityBins.empty().add(result, y)
    curves["built ensemble"] = (*b.curve()[:2], b.ece())
    plot_reliability(curves, path, title="validation: before / after temperature scaling")


def format_build_table(doc: dict[str, Any]) -> str:
    v = doc["validation"]
    rows = [(c["name"], f"{c['temperature']:.3f}", f"{c['weight']:.3f}", c["acc"], c["nll"], c["nll_calibrated"],
             c["ece"], c["ece_calibrated"]) for c in v["candidates"]]
    pm = v["plain_mean"]
    rows.append(("plain mean", "1", "-", pm["acc"], pm["nll"], "", pm["ece"], ""))
    rows.append(("built, no TTA", "", "", v["selected_no_tta"]["acc"], v["selected_no_tta"]["nll"], "",
                 v["selected_no_tta"]["ece"], ""))
    rows.append((f"built, views {'+'.join(doc['views'])}", "", "", v["result"]["acc"], v["result"]["nll"], "",
                 v["result"]["ece"], ""))
    head = ("member", "T", "weight", "val_acc", "val_nll", "nll_T", "ece", "ece_T")
    cells = [tuple(f"{x:.4f}" if isinstance(x, float) else str(x) for x in r) for r in rows]
    return f"validation ({v['rows']} rows):\n" + format_table(head, cells)
