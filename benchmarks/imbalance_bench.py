"""`python -m benchmarks imbalance`: class weights against class-balanced oversampling on a long-tailed training
split (configs/study_imbalance.yaml over configs/recipes/small_images.yaml).

The long-tailed dataset is the built-in digits with its training split cut to a geometric profile, `most` rows
of class 0 down to `fewest` of class 9 (each class's rows drawn with a fixed seed), validation and test kept
whole (balanced), so test accuracy and balanced accuracy weigh every class alike. Printed per arm: test accuracy,
balanced accuracy and the mean recall of the three rarest classes, mean [95% t interval] over seeds, each arm's
paired difference to the baseline, and scikit-learn's SVC on the raw 8x8 scans of the same rows, plain and with
`class_weight="balanced"`. A finished study is only re-reported; remove its directory to measure again.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow.parquet as pq

from benchmarks.common import machine
from benchmarks.study_bench import _cell, svc_accuracy
from imgcls_dist.config import load_config
from imgcls_dist.data.schema import LABEL, validate_dataset
from imgcls_dist.study.stats import paired_difference, verdict
from imgcls_dist.table import format_table

LAYERS = ("configs/recipes/small_images.yaml", "configs/study_imbalance.yaml")
RAREST = 3  # classes whose recall is reported on its own


def long_tail_counts(num_classes: int, most: int, fewest: int) -> list[int]:
    """most x (fewest/most)^(c/(C-1)) rows for class c: a geometric profile from `most` down to `fewest`."""
    return [int(round(most * (fewest / most) ** (c / max(num_classes - 1, 1)))) for c in range(num_classes)]


def write_long_tail(source: Path, out: Path, *, most: int = 100, fewest: int = 5, seed: int = 0) -> list[int]:
    """Copy a dataset with its training split cut to the long-tail profile; returns the per-class counts."""
    meta = json.loads((source / "dataset.json").read_text())
    classes = meta["classes"]
    table = pq.read_table(sorted(str(p) for p in (source / "train").glob("*.parquet")))
    labels = table.column(LABEL).to_numpy()
    counts = long_tail_counts(len(classes), most, fewest)
    rng = np.random.default_rng(seed)
    keep = np.sort(np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:n] for c, n in enumerate(counts)]))
    out.mkdir(parents=True, exist_ok=True)
    for split in ("val", "test"):
        shutil.copytree(source / split, out / split, dirs_exist_ok=True)
    (out / "train").mkdir(exist_ok=True)
    pq.write_table(table.take(keep), out / "train" / "part-00000.parquet")
    kept = np.bincount(labels[keep], minlength=len(classes))
    meta["counts"]["train"] = int(len(keep))
    meta["class_counts"]["train"] = {name: int(n) for name, n in zip(classes, kept)}
    meta["source"] = f"{meta['source']}, training split long-tailed {most} -> {fewest} (seed {seed})"
    (out / "dataset.json").write_text(json.dumps(meta, indent=1))
    return [int(n) for n in kept]


def _rare_recall(trial_dir: Path, rare: Sequence[str]) -> float | None:
    report = trial_dir / "metrics.json"
    if not report.is_file():
        return None
    recall = json.loads(report.read_text())["per_class_recall"]
    return float(np.mean([recall[c] for c in rare]))


def bench_imbalance(workdir: str = "runs/bench_imbalance", configs: Sequence[str] = LAYERS,
                    overrides: Sequence[str] = ()) -> dict[str, Any]:
    from imgcls_dist.data.ingest import ingest
    from imgcls_dist.study.runner import run_study

    work = Path(workdir).resolve()
    digits, data = work / "data" / "digits", work / "data" / "digits_longtail"
    if not (digits / "dataset.json").is_file():
        ingest("builtin:digits", digits, image_size=32, seed=0, verbose=False)
    if not (data / "dataset.json").is_file():
        write_long_tail(digits, data)
    meta = validate_dataset(data)
    counts = meta["class_counts"]["train"]
    rare = sorted(counts, key=lambda c: counts[c])[:RAREST]
    cfg = load_config(list(configs), [f"data.path={data}", f"run.storage_path={work / 'runs'}", *overrides])
    study_dir = work / "runs" / cfg.run.name
    report = run_study(cfg, resume=any(study_dir.glob("experiment_state-*.json")))
    rows = [r for r in report["rows"] if r["status"] == "TERMINATED"]
    arms, base = list(cfg.study.arms), cfg.study.baseline
    per_arm = {arm: {"test_acc": {}, "test_balanced_acc": {}, "rare_recall": {}} for arm in arms}
    for r in rows:
        m = per_arm[r["arm"]]
        m["test_acc"][r["seed"]] = r["test_acc"]
        m["test_balanced_acc"][r["seed"]] = r["test_balanced_acc"]
        m["rare_recall"][r["seed"]] = _rare_recall(study_dir / "trials" / r["trial"], rare)
    table = []
    for arm in arms:
        cells = [_cell(list(per_arm[arm][k].values())) for k in ("test_acc", "test_balanced_acc", "rare_recall")]
        diff = "-"
        if arm != base:
            p = paired_difference(per_arm[arm]["test_balanced_acc"], per_arm[base]["test_balanced_acc"])
            diff = f"{p.mean_diff:+.4f} ({verdict(p, 'higher')})" if p.n else "-"
        table.append([arm, *cells, diff])
    svc = {k: svc_accuracy(str(data), meta["classes"], 0, None, balanced=k == "balanced")
           for k in ("plain", "balanced")}
    table += [[f"SVC ({k}, 8x8 scans)", f"{v:.4f}", "", "", ""] for k, v in svc.items()]
    print(f"\n{machine()}\nlong-tailed digits, training rows per class {counts}; test split balanced "
          f"({meta['counts']['test']} images); {cfg.model.arch}, {' + '.join(configs)}; mean [95% t interval] over "
          f"seeds {cfg.study.seeds}; rarest classes {', '.join(rare)}")
    print(format_table(["arm", "test acc", "balanced acc", f"recall, {RAREST} rarest", f"balanced acc vs {base}"],
                       table))
    return {"machine": machine(), "train_counts": counts, "rare": rare, "arms": per_arm, "svc": svc,
            "study": report["report"]}
