"""`imgcls-dist study`: every unit x seed as one Ray Tune trial (a grid run to completion, no early stopping),
each trial a Ray Train run that measures itself (study/trial.py); then the report (study/report.py).

Resumable like a tune campaign: `--resume` restores Tune's state and reruns only the trials that had not
finished. Everything lives under <run.storage_path>/<run.name>/ on any filesystem (docs/guide/study.md).
"""

from __future__ import annotations

import os
import time
from typing import Any

from imgcls_dist.config import ExperimentConfig
from imgcls_dist.study.report import COMPARISONS_CSV, STUDY_CSV, STUDY_MD, TRIALS_CSV, finalize_study
from imgcls_dist.study.spec import validate_study
from imgcls_dist.storage import ray_storage
from imgcls_dist.tune.campaign import (DRIVER_MEMORY_BYTES, TRIALS_DIR, finish_tracking, open_campaign, plan_resources,
                                       record_start, restore_tuner)

META_FILE = "study.json"  # how the study was started (sizing, units): for the record


def run_study(cfg: ExperimentConfig, *, resume: bool = False) -> dict[str, Any]:
    """Run (or resume) a study; write trials.csv, study.csv, study.md and the plots; return the report."""
    from imgcls_dist.train.job import check_tracking, ending, open_tracking

    study_dir, cfg = open_campaign(cfg, resume, what="study")
    check_tracking(cfg)  # before any Ray work: the MLflow server answers (with run.tracking: mlflow)
    units = validate_study(cfg)  # before any Ray work: a bad arm fails in a second
    seeds = cfg.study.seeds
    n_trials = len(units) * len(seeds)
    study_dir.check_writable()

    import ray.tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from imgcls_dist.ray_utils import cluster_cpus, cluster_gpus, ensure_ray
    from imgcls_dist.study.spec import tune_trial_name
    from imgcls_dist.study.trial import study_trial
    from imgcls_dist.tune.status import TrialStatusLog

    ensure_ray()
    plan = plan_resources(cfg, n_trials, cluster_cpus(), cluster_gpus())
    storage_path, storage_fs = ray_storage(study_dir.parent)
    tracking = open_tracking(cfg, study_dir, kind="study")  # the parent of the trials' runs
    trainable = ray.tune.with_resources(
        ray.tune.with_parameters(study_trial, base=cfg.to_dict(), units={u.name: u for u in units},
                                 trials_dir=(study_dir / TRIALS_DIR).uri, cwd=os.getcwd(),
                                 num_workers=plan["workers_per_trial"], use_gpu=plan["use_gpu"],
                                 latency_repeats=cfg.study.latency_repeats,
                                 tracking=tracking.link() if tracking else None),
        {"CPU": 0, "memory": DRIVER_MEMORY_BYTES})
    print(f"study {cfg.run.name}: {len(units)} unit(s) x {len(seeds)} seed(s) = {n_trials} trials, "
          f"{cfg.train.epochs} epochs each, {plan['workers_per_trial']} {'GPU' if plan['use_gpu'] else 'CPU'} "
          f"worker(s) per trial, {plan['concurrency']} at a time on {plan['cluster_cpus']:g} CPUs -> {study_dir}",
          flush=True)

    t0 = time.perf_counter()
    if resume:
        tuner = restore_tuner(study_dir, trainable, storage_fs, what="study")
    else:
        record_start(cfg, study_dir, META_FILE, plan, units=[u.name for u in units], seeds=seeds, num_trials=n_trials)
        tuner = ray.tune.Tuner(
            trainable,
            param_space={"unit": ray.tune.grid_search([u.name for u in units]),
                         "seed": ray.tune.grid_search(list(seeds))},
            tune_config=ray.tune.TuneConfig(
                num_samples=1,
                search_alg=BasicVariantGenerator(max_concurrent=plan["concurrency"]),
                reuse_actors=False, trial_name_creator=tune_trial_name,
                trial_dirname_creator=tune_trial_name),
            run_config=ray.tune.RunConfig(
                name=cfg.run.name, storage_path=storage_path, storage_filesystem=storage_fs,
                failure_config=ray.tune.FailureConfig(max_failures=0),
                callbacks=[TrialStatusLog(study_dir, tune_trial_name)], verbose=1),
        )
    with ending(tracking):
        grid = tuner.fit()
        report = finalize_study(cfg, study_dir, units, grid, wall_s=time.perf_counter() - t0)
    if tracking:
        finish_tracking(tracking, study_dir, report, [META_FILE, TRIALS_CSV, STUDY_CSV, COMPARISONS_CSV, STUDY_MD])
    return report
