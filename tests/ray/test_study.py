"""A tiny study end to end (2 working arms and a failing one, 2 seeds, 1 epoch of 3 images per class), killed
once a trial has finished and resumed: finished trials are not rerun, every trial has every metric, the failing
arm is reported beside the others, and the report compares with the baseline."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers.ray_cluster import kill_group
from helpers.tune_state import trial_states

from imgcls_dist.config import build_config
from imgcls_dist.errors import UserError
from imgcls_dist.study.metrics import METRICS
from imgcls_dist.study.runner import run_study

pytestmark = pytest.mark.e2e

BASE = {"model": {"arch": "lenet5"}, "data": {"image_size": 16, "batch_size": 8, "loader_workers": 0,
                                               "train_per_class": 3},
        "train": {"epochs": 1, "optimizer": "adamw", "lr": 0.003, "warmup_epochs": 0},
        "scaling": {"num_workers": 1}, "run": {"keep_checkpoints": 1, "tensorboard": False}}
# Metrics every finished trial has a number for on CPU (peak_gpu_mb is 0.0 there, still a number)
EVERY = [m.key for m in METRICS]


def read_csv(p: Path) -> list[dict]:
    return list(csv.DictReader(p.open()))


def _start(cmd: list[str], env: dict, log: Path) -> subprocess.Popen:
    with open(log, "w") as f:
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)


@pytest.fixture(scope="module")
def killed_and_resumed(tiny_digits_dir, tmp_path_factory):
    """`imgcls-dist study` processes with their own local Ray, as a user runs them: killed once a trial has
    finished, then resumed. -> (study dir, the trials finished before the kill with their metrics' mtimes)."""
    tmp = tmp_path_factory.mktemp("study")
    storage = tmp / "runs"
    raw = {**BASE, "data": {**BASE["data"], "path": str(tiny_digits_dir)},
           "run": {**BASE["run"], "storage_path": str(storage), "name": "tiny"},
           "study": {"seeds": [0, 1], "baseline": "adamw", "latency_repeats": 5,
                     "arms": {"adamw": {}, "sgd": {"train.optimizer": "sgd", "train.lr": 0.05},
                              "broken": {"model.weights": str(tmp / "bad_weights.pt")}},
                     "constraints": {"max_latency_ms": 1000.0, "max_model_mb": 5.0, "min_test_acc": 0.0}}}
    (tmp / "bad_weights.pt").write_bytes(b"not a checkpoint")  # exists (passes validation), fails to load
    config = tmp / "study.yaml"
    config.write_text(json.dumps(raw))  # JSON is YAML
    cmd = [sys.executable, "-m", "imgcls_dist.cli", "study", "--config", str(config)]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local Ray
    env["TUNE_GLOBAL_CHECKPOINT_S"] = "1"  # Tune snapshots its state every second, not every 10
    study_dir = storage / "tiny"
    proc = _start(cmd, env, tmp / "driver.log")
    deadline = time.time() + 300
    try:
        while time.time() < deadline and "TERMINATED" not in trial_states(study_dir).values():
            assert proc.poll() is None, (tmp / "driver.log").read_text()[-3000:]
            time.sleep(0.5)
    finally:
        kill_group(proc)  # the driver and the local Ray it started
    finished = sorted(t for t, st in trial_states(study_dir).items() if st == "TERMINATED")
    assert 0 < len(finished) < 6, (finished, (tmp / "driver.log").read_text()[-3000:])
    stamps = {t: (study_dir / "trials" / t / "study_metrics.json").stat().st_mtime_ns for t in finished}
    with pytest.raises(UserError, match="already exists: pass --resume to continue that study"):
        run_study(build_config(raw))
    resumed = _start([*cmd, "--resume"], env, tmp / "resume.log")
    try:
        resumed.wait(400)
    finally:
        kill_group(resumed)
    assert resumed.returncode == 0, (tmp / "resume.log").read_text()[-3000:]
    return study_dir, stamps


@pytest.mark.own_ray
def test_a_killed_study_resumes_without_rerunning_finished_trials(killed_and_resumed):
    study_dir, stamps = killed_and_resumed
    for t, stamp in stamps.items():  # not rerun: the measurements written before the kill are untouched
        assert (study_dir / "trials" / t / "study_metrics.json").stat().st_mtime_ns == stamp
    assert len(read_csv(study_dir / "trials.csv")) == 6


@pytest.mark.own_ray
def test_every_trial_records_every_metric_and_a_failing_arm_is_reported_beside_the_others(killed_and_resumed):
    d, _ = killed_and_resumed
    rows = {r["trial"]: r for r in read_csv(d / "trials.csv")}
    assert sorted(rows) == ["adamw_s0", "adamw_s1", "broken_s0", "broken_s1", "sgd_s0", "sgd_s1"]
    for name in ("adamw_s0", "adamw_s1", "sgd_s0", "sgd_s1"):
        r = rows[name]
        assert r["status"] == "TERMINATED" and not r["error"], r
        missing = [k for k in EVERY if r[k] == ""]
        assert not missing, (name, missing)
        assert 0 <= float(r["test_acc"]) <= 1 and 0 <= float(r["train_clean_acc"]) <= 1
        assert float(r["overfit_gap"]) == pytest.approx(float(r["train_clean_acc"]) - float(r["test_acc"]))
        assert int(r["train_rows"]) == 30  # 3 per class
        assert 0 < float(r["latency_p50_ms"]) <= float(r["latency_p95_ms"])
        assert int(r["params"]) >= int(r["trainable_params"]) > 0
        metrics = json.loads((d / "trials" / name / "study_metrics.json").read_text())
        # 30 rows in batches of 8 on one worker: 4 optimizer steps in the one epoch, each at its epoch's LR
        assert len(metrics["lr_curve"]) == 4 and len(metrics["val_curve"]) == 1
        assert int(r["steps_to_95pct_best"]) == 4
    for name in ("broken_s0", "broken_s1"):
        assert rows[name]["status"] == "ERROR" and "bad_weights.pt" in rows[name]["error"], rows[name]
    units = {u["unit"]: u for u in read_csv(d / "study.csv")}
    assert units["broken"]["seeds_ok"] == "0" and units["broken"]["failed"] == "broken_s0 broken_s1"
    assert units["adamw"]["seeds_ok"] == "2" and units["adamw"]["test_acc_lo"] != ""
    mean = sum(float(rows[f"adamw_s{i}"]["test_acc"]) for i in (0, 1)) / 2
    assert float(units["adamw"]["test_acc_mean"]) == pytest.approx(mean)


@pytest.mark.own_ray
def test_the_report_compares_with_the_baseline_and_names_the_arms_meeting_the_constraints(killed_and_resumed):
    d, _ = killed_and_resumed
    comps = [c for c in read_csv(d / "comparisons.csv") if c["metric"] == "test_acc"]
    by_unit = {c["unit"]: c for c in comps}
    assert set(by_unit) == {"sgd", "broken"}
    rows = {r["trial"]: r for r in read_csv(d / "trials.csv")}
    diff = sum(float(rows[f"sgd_s{i}"]["test_acc"]) - float(rows[f"adamw_s{i}"]["test_acc"]) for i in (0, 1)) / 2
    assert by_unit["sgd"]["n"] == "2" and float(by_unit["sgd"]["mean_diff"]) == pytest.approx(diff)
    assert by_unit["sgd"]["verdict"] in ("better", "worse", "not distinguishable with 2 seeds")
    assert by_unit["broken"]["verdict"] == "needs 2 or more paired seeds"
    md = (d / "study.md").read_text()
    assert "Student-t" in md and "broken_s0" in md and "Meeting all of them: adamw, sgd." in md
    for png in ("lr_schedules.png", "val_curves.png", "train_vs_test.png", "efficiency.png", "pareto.png"):
        assert (d / png).read_bytes()[:4] == b"\x89PNG", png
        assert f"]({png})" in md
    assert not (d / "accuracy_vs_train_size.png").exists()  # no sweep
