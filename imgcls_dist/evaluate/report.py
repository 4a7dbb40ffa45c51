"""Evaluate prediction sets written by `infer`: accuracy, per-class report, confusion matrix, comparisons.

Only completed runs are read (their `_manifest.json` lists the files), and only the small columns
(pred, label, error): memory is ~20 bytes per row. The probabilities are read file by file for the
calibration numbers (NLL, expected calibration error, the reliability diagram), never all at once.
Accuracy is over rows that have both a label and a prediction; error rows and unlabeled rows are
counted separately, never silently mixed in.
"""

from __future__ import annotations

import csv
import io
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from sklearn.metrics import accuracy_score

from imgcls_dist.data.schema import LABEL, read_dataset_meta
from imgcls_dist.errors import UserError
from imgcls_dist.evaluate.files import COMPARISON_CSV, RELIABILITY_PLOT
from imgcls_dist.evaluate.metrics import ECE_BINS, ReliabilityBins, write_classification_report
from imgcls_dist.evaluate.plots import plot_reliability
from imgcls_dist.batch.publish import ERROR, prediction_files, read_manifest
from imgcls_dist.storage import PathLike, location
from imgcls_dist import table




def _load_columns(out: PathLike) -> pa.Table:
    files = prediction_files(out)
    if not files:
        return pa.table({"pred": pa.array([], pa.int32()), LABEL: pa.array([], pa.int64()),
                         ERROR: pa.array([], pa.string())})
    if LABEL not in pq.ParquetFile(files[0].path, filesystem=files[0].fs).schema_arrow.names:
        raise UserError(f"{out}: predictions have no 'label' column (the input had no labels); nothing to evaluate")
    return pa.concat_tables(pq.read_table(f.path, filesystem=f.fs, columns=["pred", LABEL, ERROR]) for f in files)


def calibration(out: PathLike) -> tuple[float, ReliabilityBins]:
    """(mean NLL, reliability bins) over the rows with a label and a prediction, file by file."""
    bins, nll_sum, n = ReliabilityBins.empty(), 0.0, 0
    for f in prediction_files(out):
        t = pq.read_table(f.path, filesystem=f.fs, columns=["probs", LABEL, ERROR])
        ok = (t.column(LABEL).is_valid().to_numpy(zero_copy_only=False)
              & t.column(ERROR).is_null().to_numpy(zero_copy_only=False))
        if not ok.any():
            continue
        t = t.filter(pa.array(ok))
        probs = np.asarray(t.column("probs").combine_chunks().flatten(), np.float32).reshape(t.num_rows, -1)
        y = t.column(LABEL).to_numpy(zero_copy_only=False).astype(np.int64)
        bins.add(probs, y)
        nll_sum += float(-np.log(np.clip(probs[np.arange(len(y)), y].astype(np.float64), 1e-12, 1.0)).sum())
        n += len(y)
    return (nll_sum / n if n else float("nan")), bins


def summarize(out: PathLike, num_classes: int | None = None, with_calibration: bool = False) -> dict[str, Any]:
    """Counts and accuracy of one prediction set, plus the arrays for a full report."""
    manifest = read_manifest(out)
    t = _load_columns(out)
    labeled = t.column(LABEL).is_valid().to_numpy(zero_copy_only=False)
    predicted = t.column(ERROR).is_null().to_numpy(zero_copy_only=False)
    both = labeled & predicted
    y_true = t.column(LABEL).to_numpy(zero_copy_only=False)[both].astype(np.int64)
    y_pred = t.column("pred").to_numpy(zero_copy_only=False)[both].astype(np.int64)
    if num_classes is not None and len(y_true) and (y_true.min() < 0 or y_true.max() >= num_classes):
        bad = int(y_true.min() if y_true.min() < 0 else y_true.max())
        raise UserError(f"{out}: label {bad} outside classes [0, {num_classes - 1}]")
    models = manifest.get("models", [])
    nll, bins = calibration(out) if with_calibration and len(y_true) else (float("nan"), None)
    return {
        "out": str(out),
        "run_id": manifest.get("run_id"),
        "models": len(models),
        "archs": "+".join(m.get("arch", "?") for m in models),
        "views": ",".join(manifest.get("tta_views", [])),
        "combine": manifest.get("combine"),
        "rows": t.num_rows,
        "error_rows": int((~predicted).sum()),
        "unlabeled_rows": int((~labeled).sum()),
        "evaluated_rows": int(both.sum()),
        "accuracy": float(accuracy_score(y_true, y_pred)) if len(y_true) else float("nan"),
        "y_true": y_true,
        "y_pred": y_pred,
        "classes": manifest.get("classes"),
        "temperatures": manifest.get("temperatures"),
        "nll": nll,
        "bins": bins,
    }


def _classes(out: PathLike, classes_file: PathLike | None) -> list[str]:
    from_manifest = read_manifest(out).get("classes")
    if classes_file is None:
        if not from_manifest:
            raise UserError(f"{out}: manifest has no classes; pass --classes dataset.json")
        return list(from_manifest)
    cf = location(classes_file)
    given = read_dataset_meta(cf.parent if cf.is_file() else cf)["classes"]
    if from_manifest and list(from_manifest) != list(given):
        raise UserError(f"{classes_file}: classes differ from the models' classes in {out}/_manifest.json")
    return list(given)


def parse_compare(items: Sequence[str]) -> dict[str, str]:
    """["NAME=OUT", "OUT2"] -> {NAME: OUT, basename(OUT2): OUT2}."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep:
            name, path = location(item).name, item
        if not name or not path:
            raise UserError(f"--compare: expected NAME=OUT, got {item!r}")
        if name in out:
            raise UserError(f"--compare: name {name!r} given twice")
        out[name] = path
    return out


def _is_single_plain(s: dict[str, Any]) -> bool:
    return s["models"] == 1 and s["views"] == "identity"


def comparison_rows(sets: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per prediction set, with the accuracy gain over the best single model without TTA
    (or, when no such set is given, over the best single model)."""
    singles = [s for s in sets.values() if _is_single_plain(s)] or [s for s in sets.values() if s["models"] == 1]
    base = max((s["accuracy"] for s in singles), default=None)
    rows = []
    for name, s in sets.items():
        rows.append({
            "name": name, "models": s["models"], "archs": s["archs"], "views": s["views"], "combine": s["combine"],
            "rows": s["rows"], "errors": s["error_rows"], "evaluated": s["evaluated_rows"],
            "calibrated": "yes" if any(t != 1 for t in (s.get("temperatures") or [])) else "no",
            "accuracy": round(s["accuracy"], 4),
            "vs_best_single": None if base is None else round(s["accuracy"] - base, 4),
            "nll": round(s["nll"], 4),
            "ece": round(s["bins"].ece(), 4) if s.get("bins") is not None else None,
        })
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    keys = list(rows[0])
    def cell(k: str, v: Any) -> str:
        return "" if v is None else (f"{v:+.4f}" if k == "vs_best_single" else str(v))

    return table.format_table(keys, [[cell(k, r[k]) for k in keys] for r in rows])


def evaluate_predictions(
    out: PathLike,
    *,
    classes_file: PathLike | None = None,
    compare: dict[str, str] | None = None,
    report_dir: PathLike | None = None,
    name: str | None = None,
    verbose: bool = True,
) -> dict[str, Any]:
    """Report for OUT (classification_report.txt, confusion_matrix.png, metrics.json in report_dir,
    default OUT/eval) and, with `compare`, a comparison table (printed and comparison.csv)."""
    classes = _classes(out, classes_file)
    main = summarize(out, len(classes), with_calibration=bool(compare))
    if not main["evaluated_rows"]:
        raise UserError(f"{out}: nothing to evaluate: no row has both a label and a prediction "
                        f"({main['rows']} rows, {main['error_rows']} errors, {main['unlabeled_rows']} without label)")
    out_name = name or location(out).name
    report_dir = location(report_dir) if report_dir is not None else location(out) / "eval"
    extra = {k: main[k] for k in ("run_id", "error_rows", "unlabeled_rows", "evaluated_rows", "views", "combine")}
    extra["total_rows"] = main["rows"]
    # The figure's title names the prediction set, not its path (a long URI runs off the figure).
    summary = write_classification_report(main["y_true"], main["y_pred"], classes, report_dir,
                                          title=f"predictions {out_name}", extra=extra)
    result: dict[str, Any] = {**summary, "report_dir": report_dir.uri}
    say = print if verbose else (lambda *a, **k: None)
    say(f"evaluate {out}: accuracy {main['accuracy']:.4f} (balanced {summary['balanced_accuracy']:.4f}) on "
        f"{main['evaluated_rows']} rows "
        f"({main['error_rows']} error rows, {main['unlabeled_rows']} rows without label) -> {report_dir}")
    if compare:
        sets = {out_name: main}
        for cname, cpath in compare.items():
            if cname in sets:
                raise UserError(f"--compare: name {cname!r} clashes with the main prediction set's name")
            s = summarize(cpath, len(classes), with_calibration=True)
            if s["classes"] and list(s["classes"]) != classes:
                raise UserError(f"{cpath}: classes differ from {out}")
            sets[cname] = s
        rows = comparison_rows(sets)
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
        (report_dir / COMPARISON_CSV).write_text(buf.getvalue())
        curves = {name: (*s["bins"].curve()[:2], s["bins"].ece()) for name, s in sets.items() if s["bins"] is not None}
        plot_reliability(curves, report_dir / RELIABILITY_PLOT, title="reliability (top-1 confidence)")
        say(format_table(rows))
        say(f"calibration: {report_dir / RELIABILITY_PLOT} (nll: mean negative log-likelihood; ece: expected "
            f"calibration error, {ECE_BINS} bins)")
        result["comparison"] = rows
    return result
