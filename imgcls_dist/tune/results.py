"""A finished campaign's outputs: results.csv + table, best.yaml, ensemble.json (+ exported models).

Per-trial numbers come from the trial's own Train run on disk (`<campaign>/trials/<trial>/checkpoint_*`):
the latest checkpoint's `history.json` is every epoch the trial trained (across a resume too), and
the checkpoint with the highest val_acc is the trial's best model. Status and error come from Tune.
"""

from __future__ import annotations

import csv
import io
import json
import math
from typing import Any

from imgcls_dist.config import ExperimentConfig, TuneConfig, build_config, write_config
from imgcls_dist.errors import UserError
from imgcls_dist.ensemble.build import build_ensemble
from imgcls_dist.predictor.manifest import ENSEMBLE_FILE
from imgcls_dist.models.checkpoint import MODEL_FILE, load_model_file
from imgcls_dist.storage import Location, PathLike, location
from imgcls_dist.train.state import HISTORY
from imgcls_dist.tune.space import apply_sampled
from imgcls_dist import table

RESULTS_FILE = "results.csv"
BEST_FILE = "best.yaml"


def _checkpoint_dirs(run_dir: Location) -> list[tuple[Location, list[dict]]]:
    """(checkpoint dir, its history) for every complete checkpoint of a Train run, oldest epoch first."""
    out = []
    for d in run_dir.iterdir():
        if not d.name.startswith("checkpoint_"):
            continue
        h = d / HISTORY
        if not (d / MODEL_FILE).is_file() or not h.is_file():
            continue  # a checkpoint the run was killed while writing
        try:
            hist = json.loads(h.read_text())
        except (UserError, json.JSONDecodeError):
            continue
        if hist:
            out.append((d, hist))
    out.sort(key=lambda x: x[1][-1]["epoch"])
    return out


def _loads(model_dir: Location) -> bool:
    try:
        load_model_file(model_dir)
        return True
    except Exception:  # noqa: BLE001 - a checkpoint cut short when its run was stopped
        return False


def trial_history(run_dir: Location) -> tuple[list[dict], Location | None, dict | None]:
    """(epochs trained, best checkpoint dir, the history row of the best epoch) of one trial's Train run."""
    ckpts = _checkpoint_dirs(run_dir)
    if not ckpts:
        return [], None, None
    history = ckpts[-1][1]
    # Highest val_acc; ties go to the lower val_loss, then the earlier epoch. A model file that does not
    # load (the run was stopped while it was being copied) is passed over.
    ranked = sorted(ckpts, key=lambda x: (-x[1][-1]["val_acc"], x[1][-1]["val_loss"], x[1][-1]["epoch"]))
    for d, hist in ranked:
        if _loads(d):
            return history, d, hist[-1]
    return history, None, None


def sort_rows(rows: list[dict]) -> list[dict]:
    return sorted(rows, key=lambda r: (r["best_val_acc"] is None, -(r["best_val_acc"] or 0.0),
                                       r["val_loss"] if r["val_loss"] is not None else math.inf, r["trial"]))


def result_columns(keys: list[str]) -> list[str]:
    return ["trial", *keys, "best_val_acc", "val_loss", "best_epoch", "final_val_acc", "epochs_run",
            "epochs_reported", "stopped_early", "status", "error", "checkpoint"]


def fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def write_results_csv(rows: list[dict], keys: list[str], path: PathLike) -> Location:
    cols = result_columns(keys)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in sort_rows(rows):
        w.writerow({c: ("" if r.get(c) is None else (json.dumps(r[c]) if isinstance(r[c], list) else r[c]))
                    for c in cols})
    return location(path).write_text(buf.getvalue())


def read_results_csv(path: PathLike) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(location(path).read_text())))


def format_table(rows: list[dict], keys: list[str], max_error: int = 60) -> str:
    cols = [c for c in result_columns(keys) if c not in ("checkpoint", "final_val_acc", "epochs_reported")]
    body = []
    for r in sort_rows(rows):
        cells = []
        for c in cols:
            s = fmt(r.get(c))
            if c == "error" and len(s) > max_error:
                s = s[: max_error - 3] + "..."
            cells.append(s)
        body.append(cells)
    head = [c.replace("train.", "").replace("augment.", "aug.") for c in cols]
    return table.format_table(head, body)


def best_config(base: dict[str, Any], row: dict[str, Any], keys: list[str], *, name: str, storage_path: str,
                num_workers: int) -> ExperimentConfig:
    """The best trial as a complete, standalone training config (tune section reset, own run.name)."""
    raw = apply_sampled(base, {k: row[k] for k in keys})
    raw["run"] = {**raw.get("run", {}), "name": name, "storage_path": storage_path}
    raw["tune"] = TuneConfig().model_dump(mode="json")
    # The same worker count as the trial: DDP over a different world changes every batch.
    raw["scaling"] = {**raw.get("scaling", {}), "num_workers": num_workers}
    return build_config(raw, source=BEST_FILE)


def write_best_yaml(cfg: ExperimentConfig, row: dict, path: PathLike) -> Location:
    header = (f"# Best trial of tune campaign: {row['trial']} (best val_acc {row['best_val_acc']:.4f} at epoch "
              f"{row['best_epoch'] + 1} of {row['epochs_run']}).\n# Retrain: imgcls-dist train --config {path}\n")
    return write_config(cfg, path, header=header)


def write_ensemble(rows: list[dict], top_k: int, campaign_dir: Location, val: PathLike,
                   max_val_rows: int | None = None) -> tuple[Location | None, list[dict]]:
    """Copy the top-k trials' best model.pt to models/<trial>/ and build ensemble.json from them on the
    validation split (`ensemble.build`: temperatures, greedy member and view selection). Member paths are
    relative to the campaign directory, so the campaign can be copied or moved as a whole."""
    ranked = [r for r in sort_rows(rows) if r["best_val_acc"] is not None and r.get("checkpoint")]
    top = ranked[:top_k]
    if not top:
        return None, []
    copied = [(location(r["checkpoint"]) / MODEL_FILE).copy_to(campaign_dir / "models" / r["trial"] / MODEL_FILE).uri
              for r in top]
    doc = build_ensemble(copied, val, campaign_dir / ENSEMBLE_FILE, max_rows=max_val_rows)
    return campaign_dir / ENSEMBLE_FILE, doc["models"]
