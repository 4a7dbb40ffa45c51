"""The pretrained-vs-scratch study (configs/study_pretrained.yaml) end to end, with scikit-learn's SVC on the
same training subsets beside it: the table of mean test accuracy (95 % t interval over seeds) per training-set
size that small-data recipes are judged by.

Every step is skipped when its output exists (the datasets, the pretrained source, a finished study: it is
then only re-reported through `--resume`), so a rerun after a recipe change costs the study alone once its
directory is removed. The SVC sees the raw 8x8 scans (sklearn's digits, pixel values / 16) of exactly the
rows each trial trained on (the same stratified subset for the same seed) and is scored on the same test split.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from benchmarks.common import machine
from imgcls_dist.config import build_config, load_config, read_yaml
from imgcls_dist.data.schema import ID, LABEL, validate_dataset
from imgcls_dist.errors import UserError
from imgcls_dist.storage import location
from imgcls_dist.study.spec import value_label
from imgcls_dist.study.stats import mean_ci, paired_difference, verdict
from imgcls_dist.table import format_table
from imgcls_dist.train.stream import group_rows
from imgcls_dist.train.subset import subset_row_groups

PRETRAIN = "configs/pretrain_digits_0to4.yaml"
HALVES = {"digits_0to4": "0,1,2,3,4", "digits_5to9": "5,6,7,8,9"}


def _ingest_halves(work: Path) -> None:
    from imgcls_dist.data.ingest import ingest

    for name, classes in HALVES.items():
        if not (work / "data" / name / "dataset.json").is_file():
            ingest("builtin:digits", work / "data" / name, image_size=32, seed=0, classes=classes.split(","),
                   verbose=False)


def _pretrain(work: Path) -> Path:
    from imgcls_dist.train.job import run_training

    cfg = load_config(PRETRAIN, [f"data.path={work / 'data' / 'digits_0to4'}", f"run.storage_path={work / 'runs'}"])
    model = work / "runs" / cfg.run.name / "model.pt"
    if not model.is_file():
        run_training(cfg, report_test=True)
    return model


def _study_config(config: str, work: Path, weights: Path, overrides: tuple[str, ...]):
    raw = read_yaml(config)
    study = raw.get("study") or {}
    if not {"scratch", "pretrained"} <= set(study.get("arms") or {}) or len(study.get("sweep") or {}) != 1:
        raise UserError(f"{config}: this benchmark needs arms named scratch and pretrained and one swept key "
                        "(as configs/study_pretrained.yaml has)")
    raw["data"]["path"] = str(work / "data" / "digits_5to9")
    raw["run"]["storage_path"] = str(work / "runs")
    raw["study"]["arms"]["pretrained"]["model.weights"] = str(weights)
    return build_config(raw, list(overrides), source=config)


def _ids_labels(group) -> tuple[list[str], list[int]]:
    f = location(group.file)
    t = group_rows(pq.ParquetFile(f.path, filesystem=f.fs).read_row_group(group.index, columns=[ID, LABEL]), group)
    return t.column(ID).to_pylist(), t.column(LABEL).to_pylist()


def _split(groups) -> tuple[list[str], np.ndarray]:
    pairs = [_ids_labels(g) for g in groups]
    return [i for ids, _ in pairs for i in ids], np.array([y for _, ys in pairs for y in ys])


def _scans(ids: list[str]) -> np.ndarray:
    """digits-00042 -> the 8x8 scan sklearn's digits hold at index 42, flattened, in [0, 1]."""
    from sklearn.datasets import load_digits

    data = load_digits().data / 16.0
    return data[[int(i.rsplit("-", 1)[1]) for i in ids]]


def svc_accuracy(data: str, classes: list[str], seed: int, per_class: int | None, balanced: bool = False) -> float:
    """scikit-learn's SVC (class_weight "balanced" with `balanced`) on the raw 8x8 scans of the training rows a
    trial with this seed trains on (the whole split with per_class None), scored on the test split."""
    from sklearn.svm import SVC

    from imgcls_dist.train.stream import list_row_groups

    meta = validate_dataset(data, splits=("train", "test"))
    train_files = [f.uri for f in meta["files"]["train"]]
    groups = (list_row_groups(train_files) if per_class is None else
              subset_row_groups(train_files, classes, seed=seed, per_class=per_class))
    ids, y = _split(groups)
    test_ids, test_y = _split(list_row_groups([f.uri for f in meta["files"]["test"]]))
    clf = SVC(class_weight="balanced" if balanced else None).fit(_scans(ids), y)
    return float((clf.predict(_scans(test_ids)) == test_y).mean())


def _cell(values: list[float | None]) -> str:
    iv = mean_ci(values)
    if iv.mean is None:
        return "-"
    return f"{iv.mean:.4f}" + ("" if iv.lo is None else f" [{iv.lo:.4f}, {iv.hi:.4f}]")


def bench_study(workdir: str = "runs/bench_study", config: str = "configs/study_pretrained.yaml",
                overrides: tuple[str, ...] = ()) -> dict[str, Any]:
    from imgcls_dist.study.runner import run_study

    work = Path(workdir).resolve()
    _ingest_halves(work)
    weights = _pretrain(work)
    cfg = _study_config(config, work, weights, overrides)
    report = run_study(cfg, resume=any((work / "runs" / cfg.run.name).glob("experiment_state-*.json")))
    rows = [r for r in report["rows"] if r["status"] == "TERMINATED"]
    key = next(iter(cfg.study.sweep))
    classes = validate_dataset(cfg.data.path)["classes"]
    table, result = [], {"machine": machine(), "study": report["report"], "sizes": {}}
    for v in cfg.study.sweep[key]:
        acc = {arm: {r["seed"]: r["test_acc"] for r in rows if r["arm"] == arm and r["sweep_value"] == v}
               for arm in cfg.study.arms}
        svc = {s: svc_accuracy(cfg.data.path, classes, s, v) for s in cfg.study.seeds}
        p = paired_difference(acc["pretrained"], acc["scratch"])
        table.append([value_label(v, key), _cell(list(acc["scratch"].values())),
                      _cell(list(acc["pretrained"].values())),
                      _cell(list(svc.values())), f"{p.mean_diff:+.4f} ({verdict(p, 'higher')})" if p.n else "-"])
        result["sizes"][value_label(v, key)] = {"scratch": acc["scratch"], "pretrained": acc["pretrained"], "svc": svc}
    print(f"\n{machine()}\ntest accuracy on the digits 5-9, mean [95% t interval] over seeds {cfg.study.seeds}; "
          f"lenet5 {cfg.train.epochs} epochs; pretrained = trained on the digits 0-4 first")
    print(format_table(["images per class", "scratch", "pretrained", "SVC (8x8 scans)", "pretrained - scratch"],
                       table))
    return result
