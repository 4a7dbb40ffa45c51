"""`python -m benchmarks recipes`: a recipe's study (configs/study_recipe_small.yaml over
configs/recipes/small_images.yaml) on the built-in digits, with scikit-learn's SVC on the raw 8x8 scans of the
same training rows (per seed and training-set size) beside every arm: mean test accuracy with its 95% t
interval over seeds, and each arm's paired difference to the baseline arm.

A finished study is only re-reported (`--resume`); remove its directory to measure again.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from benchmarks.common import machine
from benchmarks.study_bench import _cell, svc_accuracy
from imgcls_dist.config import load_config
from imgcls_dist.data.schema import validate_dataset
from imgcls_dist.study.spec import value_label
from imgcls_dist.study.stats import paired_difference, verdict
from imgcls_dist.table import format_table

LAYERS = ("configs/recipes/small_images.yaml", "configs/study_recipe_small.yaml")


def bench_recipes(workdir: str = "runs/bench_recipes", configs: Sequence[str] = LAYERS,
                  overrides: Sequence[str] = ()) -> dict[str, Any]:
    from imgcls_dist.data.ingest import ingest
    from imgcls_dist.study.runner import run_study

    work = Path(workdir).resolve()
    data = work / "data" / "digits"
    if not (data / "dataset.json").is_file():
        ingest("builtin:digits", data, image_size=32, seed=0, verbose=False)
    cfg = load_config(list(configs), [f"data.path={data}", f"run.storage_path={work / 'runs'}", *overrides])
    report = run_study(cfg, resume=any((work / "runs" / cfg.run.name).glob("experiment_state-*.json")))
    rows = [r for r in report["rows"] if r["status"] == "TERMINATED"]
    key = next(iter(cfg.study.sweep))
    classes = validate_dataset(cfg.data.path)["classes"]
    arms, base = list(cfg.study.arms), cfg.study.baseline
    table, result = [], {"machine": machine(), "study": report["report"], "sizes": {}}
    for v in cfg.study.sweep[key]:
        acc = {arm: {r["seed"]: r["test_acc"] for r in rows if r["arm"] == arm and r["sweep_value"] == v}
               for arm in arms}
        svc = {s: svc_accuracy(cfg.data.path, classes, s, v) for s in cfg.study.seeds}
        diffs = []
        for arm in arms:
            if arm != base:
                p = paired_difference(acc[arm], acc[base])
                diffs.append(f"{arm} {p.mean_diff:+.4f} ({verdict(p, 'higher')})" if p.n else f"{arm} -")
        table.append([value_label(v, key), *(_cell(list(acc[a].values())) for a in arms), _cell(list(svc.values())),
                      "; ".join(diffs)])
        result["sizes"][value_label(v, key)] = {**acc, "svc": svc}
    print(f"\n{machine()}\ntest accuracy on the digits (10 classes), mean [95% t interval] over seeds "
          f"{cfg.study.seeds}; {cfg.model.arch}, {' + '.join(configs)}")
    print(format_table(["images per class", *arms, "SVC (8x8 scans)", f"vs {base}"], table))
    return result
