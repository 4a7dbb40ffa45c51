"""What runs inside one study trial (one unit, one seed): its Ray Train run, the run's own artifacts
(model.pt, metrics.csv, summary.json, the test report), then the study's measurements in study_metrics.json."""

from __future__ import annotations

import json
import os
import time

from imgcls_dist.config import CONFIG_FILE, write_config
from imgcls_dist.storage import location
from imgcls_dist.study.measure import measure_run
from imgcls_dist.study.metrics import STUDY_METRICS_FILE
from imgcls_dist.study.spec import Unit, trial_name, unit_overrides
from imgcls_dist.train.job import (RUN_ARTIFACTS, build_trainer, finalize_run, fit, open_tracking, resolve_dataset,
                                   resolve_epochs)
from imgcls_dist.tune.report import EpochReportCallback
from imgcls_dist.tune.space import trial_config
from imgcls_dist.tune.trial import HEALTH_CHECK_INTERVAL_S


def study_trial(config: dict, base: dict | None = None, units: dict[str, Unit] | None = None,
                trials_dir: str = "", cwd: str | None = None, num_workers: int = 1, use_gpu: bool = False,
                latency_repeats: int = 50, tracking=None) -> None:
    """Runs in the trial's Tune actor; a failure marks the trial ERROR with its one-line reason. tracking: the
    study run's train.tracked.Link with run.tracking: mlflow (the trial's run is its child)."""
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", HEALTH_CHECK_INTERVAL_S)
    unit, seed = (units or {})[config["unit"]], int(config["seed"])
    name = trial_name(unit.name, seed)
    cfg = trial_config(base or {}, unit_overrides(unit, seed), name, trials_dir, cwd=cwd)
    ds = resolve_dataset(cfg)
    cfg = resolve_epochs(cfg, ds["train_rows"], num_workers)
    out = location(trials_dir) / name
    write_config(cfg, out / CONFIG_FILE)
    # A trial that fails leaves its MLflow run to the study, which ends it as the trial ended (study/runner.py).
    run = open_tracking(cfg, out, kind="trial", link=tracking)
    t0 = time.perf_counter()
    result = fit(build_trainer(cfg, ds, num_workers, use_gpu,
                               callbacks=[*(run.callbacks() if run else []), EpochReportCallback()]))
    summary = finalize_run(result, cfg, ds, out, time.perf_counter() - t0)
    measured = measure_run(out, summary, ds["train_groups"], batch_size=cfg.data.batch_size,
                           grad_accum=cfg.train.grad_accum_steps, latency_repeats=latency_repeats)
    (out / STUDY_METRICS_FILE).write_text(json.dumps(measured, indent=1))
    if run:
        run.finish(summary["history"], summary, [*RUN_ARTIFACTS, STUDY_METRICS_FILE])
