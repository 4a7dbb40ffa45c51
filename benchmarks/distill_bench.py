"""`python -m benchmarks distill`: a LeNet-5 student taught by a validated ensemble against the ensemble itself
and against the same LeNet-5 trained on the labels alone.

The teacher is the ensemble `ensemble build` fits on the validation split (temperatures, weights, TTA views) of
the shipped resnet18_digits and lenet5_digits configs; the student is lenet5_digits again with `train.teacher`
set to that ensemble (the plain member is the same config and seed without it). Reported on the test split,
which nothing was fitted on: accuracy, and the single-image CPU latency (one thread, decode to probabilities,
p50) of the ensemble and of the student; the student's training speed with and without its teacher.
Goal: the student within 0.3 points of the ensemble's accuracy at no more than 1/4 of its latency.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from benchmarks.common import machine, print_table
from benchmarks.ensemble_bench import _test_scores, _train
from imgcls_dist.data.schema import split_files
from imgcls_dist.data.shards import read_rows
from imgcls_dist.ensemble.build import build_ensemble
from imgcls_dist.predictor.predict import load_predictor
from imgcls_dist.study.measure import single_image_latency

TEACHERS = ("resnet18_digits", "lenet5_digits")
STUDENT = "lenet5_digits"


def _speed(model: str) -> float:
    return json.loads((Path(model).parent / "summary.json").read_text())["images_per_s"]


def bench_distill(data: str = "data/digits-test30", storage: str = "runs/bench_distill", seed: int = 0,
                  alpha: float = 0.5, temperature: float = 4.0, repeats: int = 100,
                  overrides: Sequence[str] = ()) -> dict[str, Any]:
    root = Path(storage).resolve()
    members = {c: _train(c, data, seed, root) for c in TEACHERS}
    manifest = root / f"ensemble_s{seed}" / "ensemble.json"
    if not manifest.is_file():
        build_ensemble(list(members.values()), data, manifest, verbose=False)
    student = _train(STUDENT, data, seed, root, name=f"student_s{seed}", extra=[
        f"train.teacher={manifest}", f"train.distill_alpha={alpha}", f"train.distill_temperature={temperature}",
        *overrides])
    encoded = read_rows(split_files(data, "test"), limit=1).images[0]
    rows = []
    for name, models in (("ensemble (teacher)", manifest), ("student (distilled lenet5)", student),
                         ("lenet5 on labels", members[STUDENT])):
        predictor = load_predictor(models)
        rows.append({"model": name, **_test_scores(predictor, data),
                     **single_image_latency(predictor, encoded, repeats)})
    teacher, taught = rows[0], rows[1]
    result = {
        "machine": machine(), "rows": rows,
        "acc_gap_points": 100 * (teacher["test_acc"] - taught["test_acc"]),
        "latency_ratio": taught["latency_p50_ms"] / teacher["latency_p50_ms"],
        "train_speed_ratio": _speed(student) / _speed(members[STUDENT]),
    }
    print(f"bench distill: student {STUDENT} (alpha {alpha}, T {temperature}) of the ensemble of {', '.join(TEACHERS)}, "
          f"seed {seed}, on {data} (test split) - {machine()}")
    print_table(rows, list(rows[0]))
    print(f"student - ensemble: {-result['acc_gap_points']:+.2f} points of test accuracy at "
          f"{result['latency_ratio']:.3f}x its single-image latency (goal: within 0.3 points at <= 0.25x); "
          f"training with the teacher runs at {result['train_speed_ratio']:.2f}x the plain student's images/s")
    return result
