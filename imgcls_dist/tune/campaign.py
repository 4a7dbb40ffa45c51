"""`imgcls-dist tune`: a Ray Tune campaign whose trials are Ray Train runs (the Train V2 pattern).

`run_campaign` runs or resumes a campaign: each trial runs `trial.trial_driver`, which launches one Train run;
trial drivers reserve logical memory, not CPU, and trials run only as many at once as fit the cluster; ASHA
stops weak trials. `finalize_campaign` writes results.csv, plots, best.yaml and ensemble.json. Design:
docs/design.md, "Tune campaigns"; the directory: docs/design.md, "Campaign layout".
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from imgcls_dist.config import CONFIG_FILE, ExperimentConfig, build_config, read_yaml, write_config
from imgcls_dist.ensemble.build import CALIBRATION_PLOT
from imgcls_dist.errors import JobFailed, UserError
from imgcls_dist.predictor.manifest import ENSEMBLE_FILE
from imgcls_dist.storage import Location, location, ray_storage
from imgcls_dist.tune import results as R
from imgcls_dist.tune.space import (apply_sampled, candidate_values, get_dotted, num_trials, plain, to_tune_space,
                                    validate_space)

TRIALS_DIR = "trials"
META_FILE = "campaign.json"  # how the campaign was started (scheduler, sizing): resume keeps it
# Logical memory a trial driver reserves instead of CPU (docs/design.md, "Tune campaigns").
DRIVER_MEMORY_BYTES = 128 * 1024 * 1024
# Settings checked against the dataset and model registry for every value the space can produce.
_DATA_KEYS = ("model.arch", "data.image_size", "data.path", "data.in_channels", "train.progressive_resizing")


def campaign_dir_for(cfg: ExperimentConfig) -> Location:
    """<run.storage_path>/<run.name>/ on any filesystem: Tune's state, the trials' runs and every result."""
    return location(cfg.run.storage_path) / cfg.run.name


def plan_resources(cfg: ExperimentConfig, n_trials: int, cpus: float, gpus: float) -> dict[str, Any]:
    """Workers per trial (the same rule as `train`, with 1 worker when num_workers is null) and how many
    trials run at once without oversubscribing the cluster."""
    from imgcls_dist.ray_utils import plan_workers

    s = cfg.scaling
    worker_plan = plan_workers(s.num_workers, s.use_gpu, s.cpus_per_worker, cpus, gpus, default_workers=1,
                               who="a trial")
    workers, use_gpu = worker_plan.num_workers, worker_plan.use_gpu
    cpus_per_trial = workers * s.cpus_per_worker
    fit = int(cpus // cpus_per_trial + 1e-9)
    if use_gpu:
        fit = min(fit, int(gpus // workers))
    limits = [fit, n_trials] + ([cfg.tune.max_concurrent] if cfg.tune.max_concurrent else [])
    return {"workers_per_trial": workers, "use_gpu": use_gpu, "cpus_per_trial": cpus_per_trial,
            "concurrency": max(1, min(limits)), "fit": fit, "cluster_cpus": cpus, "cluster_gpus": gpus}


def _validate_against_data(cfg: ExperimentConfig) -> None:
    """Every architecture/size/dataset the space can pick must pass the same checks as `train`."""
    from imgcls_dist.train.job import resolve_dataset

    resolve_dataset(cfg)
    base = cfg.to_dict()
    for key in cfg.tune.space:
        if key not in _DATA_KEYS:
            continue
        for v in candidate_values(cfg, key):
            try:
                resolve_dataset(build_config(apply_sampled(base, {key: v})))
            except UserError as e:
                raise UserError(f"tune.space.{key}: value {v!r}: {e}") from None


def _read_meta(campaign: Location) -> dict[str, Any]:
    try:
        return json.loads((campaign / META_FILE).read_text())
    except (UserError, json.JSONDecodeError):
        return {}


def _is_nonempty_dir(p: Location) -> bool:
    return bool(p.iterdir())


def resume_config(cfg: ExperimentConfig, campaign: Location) -> ExperimentConfig:
    """The campaign's own saved config is authoritative on resume (Tune restores its saved space too)."""
    saved_path = campaign / CONFIG_FILE
    if not saved_path.is_file():
        return cfg
    saved = build_config(read_yaml(saved_path), source=str(saved_path))
    a, b = saved.to_dict(), cfg.to_dict()
    diff = [f"{s}.{k}" for s in a for k in a[s] if a[s][k] != b.get(s, {}).get(k)]
    if diff:
        print(f"resume: using the campaign's saved {saved_path} (differs from the given config in: "
              f"{', '.join(diff[:8])}{' ...' if len(diff) > 8 else ''})", flush=True)
    return saved


def _scheduler(cfg: ExperimentConfig, early_stopping: bool):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from imgcls_dist.tune.report import TIME_ATTR

    if not early_stopping:
        return FIFOScheduler()
    return ASHAScheduler(time_attr=TIME_ATTR, metric="val_acc", mode="max", max_t=cfg.train.epochs,
                         grace_period=min(cfg.tune.grace_period, cfg.train.epochs),
                         reduction_factor=cfg.tune.reduction_factor)


def asha_rungs(cfg: ExperimentConfig) -> list[int]:
    """Epochs at which ASHA compares trials (grace * rf^k below max_t)."""
    rungs, r = [], min(cfg.tune.grace_period, cfg.train.epochs)
    while r < cfg.train.epochs:
        rungs.append(r)
        r *= cfg.tune.reduction_factor
    return rungs


def open_campaign(cfg: ExperimentConfig, resume: bool, what: str = "campaign") -> tuple[Location, ExperimentConfig]:
    """<run.storage_path>/<run.name>/, new (refused if it exists) or resumed (then with its saved config)."""
    campaign = campaign_dir_for(cfg)
    exists = _is_nonempty_dir(campaign)
    if exists and not resume:
        raise UserError(f"{campaign} already exists: pass --resume to continue that {what}, or pick another "
                        f"run.name (--set run.name=...)")
    if resume and not exists:
        raise UserError(f"--resume: no {what} at {campaign} (check run.name / run.storage_path)")
    return campaign, resume_config(cfg, campaign) if resume else cfg


def restore_tuner(campaign: Location, trainable, storage_fs, what: str = "Tune campaign"):
    """The campaign's Tuner as its last snapshot left it: unfinished trials run again, finished ones are kept."""
    import ray.tune

    if not ray.tune.Tuner.can_restore(campaign.path, storage_filesystem=storage_fs):
        raise UserError(f"--resume: {campaign} holds no resumable {what}")
    return ray.tune.Tuner.restore(campaign.path, trainable=trainable, resume_unfinished=True,
                                  resume_errored=False, restart_errored=False, storage_filesystem=storage_fs)


def record_start(cfg: ExperimentConfig, campaign: Location, meta_file: str, plan: dict[str, Any],
                 **facts: Any) -> None:
    """The config and how the campaign was started and sized, beside its results."""
    write_config(cfg, campaign / CONFIG_FILE)
    sizing = {k: plan[k] for k in ("workers_per_trial", "use_gpu", "cpus_per_trial", "concurrency", "cluster_cpus",
                                   "cluster_gpus")}
    (campaign / meta_file).write_text(json.dumps({**facts, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                                                  **sizing}, indent=2) + "\n")


def run_campaign(cfg: ExperimentConfig, *, resume: bool = False, early_stopping: bool = True) -> dict[str, Any]:
    """Run (or resume) a campaign; write results.csv, plots, best.yaml and ensemble.json; return a summary."""
    campaign, cfg = open_campaign(cfg, resume)
    if resume:
        meta = _read_meta(campaign)
        if "early_stopping" in meta and meta["early_stopping"] != early_stopping:
            how = "with ASHA" if meta["early_stopping"] else "without early stopping (FIFO)"
            print(f"resume: the campaign was started {how}; it continues that way", flush=True)
            early_stopping = bool(meta["early_stopping"])
    from imgcls_dist.train.job import check_tracking, ending, open_tracking

    check_tracking(cfg)  # before any Ray work: the MLflow server answers (with run.tracking: mlflow)
    validate_space(cfg)  # before any Ray work: a bad space fails in milliseconds
    _validate_against_data(cfg)
    n_trials = num_trials(cfg)
    campaign.check_writable()

    import ray.tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from imgcls_dist.ray_utils import cluster_cpus, cluster_gpus, ensure_ray
    from imgcls_dist.train.job import resolve_dataset, resolve_epochs
    from imgcls_dist.tune.status import TrialStatusLog, trial_name
    from imgcls_dist.tune.trial import trial_driver

    ensure_ray()
    plan = plan_resources(cfg, n_trials, cluster_cpus(), cluster_gpus())
    # ASHA's max_t and rungs in the epochs the trials will run (train.min_steps can add some)
    cfg = resolve_epochs(cfg, resolve_dataset(cfg)["train_rows"], plan["workers_per_trial"])
    trials_dir = campaign / TRIALS_DIR
    storage_path, storage_fs = ray_storage(campaign.parent)
    base = cfg.to_dict()
    tracking = open_tracking(cfg, campaign, kind="tune")  # the parent of the trials' runs
    trainable = ray.tune.with_resources(
        ray.tune.with_parameters(trial_driver, base=base, trials_dir=trials_dir.uri, cwd=os.getcwd(),
                                 num_workers=plan["workers_per_trial"], use_gpu=plan["use_gpu"],
                                 tracking=tracking.link() if tracking else None),
        {"CPU": 0, "memory": DRIVER_MEMORY_BYTES})
    print(f"tune campaign {cfg.run.name}: {n_trials} trials ({cfg.tune.search} search, "
          f"{'ASHA' if early_stopping else 'FIFO, no early stopping'}), {cfg.train.epochs} epochs each, "
          f"{plan['workers_per_trial']} {'GPU' if plan['use_gpu'] else 'CPU'} worker(s) per trial, "
          f"{plan['concurrency']} at a time on {plan['cluster_cpus']:g} CPUs -> {campaign}", flush=True)

    status_log = TrialStatusLog(campaign)
    t0 = time.perf_counter()
    if resume:
        tuner = restore_tuner(campaign, trainable, storage_fs)
    else:
        record_start(cfg, campaign, META_FILE, plan, early_stopping=early_stopping, num_trials=n_trials,
                     search=cfg.tune.search)
        tuner = ray.tune.Tuner(
            trainable,
            param_space=to_tune_space(cfg),
            tune_config=ray.tune.TuneConfig(
                num_samples=cfg.tune.num_samples if cfg.tune.search == "random" else 1,
                search_alg=BasicVariantGenerator(random_state=cfg.tune.seed, max_concurrent=plan["concurrency"]),
                scheduler=_scheduler(cfg, early_stopping),
                # max_concurrent_trials would be ignored with an explicit search_alg (Tune warns and
                # runs every trial at once): the generator itself caps the trials in flight.
                reuse_actors=False,
                trial_name_creator=trial_name,
                trial_dirname_creator=trial_name,
            ),
            run_config=ray.tune.RunConfig(
                name=cfg.run.name,
                storage_path=storage_path,
                storage_filesystem=storage_fs,
                failure_config=ray.tune.FailureConfig(max_failures=0),
                callbacks=[status_log],
                verbose=1,
            ),
        )
    with ending(tracking):
        grid = tuner.fit()
        summary = finalize_campaign(cfg, campaign, grid, plan, wall_s=time.perf_counter() - t0,
                                    early_stopping=early_stopping)
    if tracking:
        finish_tracking(tracking, campaign, summary, [META_FILE, R.RESULTS_FILE, R.BEST_FILE, ENSEMBLE_FILE,
                                                      CALIBRATION_PLOT])
    return summary


def finish_tracking(tracking, campaign: Location, summary: dict[str, Any], files: list[str]) -> None:
    """The campaign's (or study's) MLflow run at the end: its trials' runs completed and ended as the trials ended
    (a trial ends its own only when it succeeds), copies of its config, `files` and plots, FINISHED."""
    status = {"ERROR": "FAILED", "UNFINISHED": "KILLED"}  # else FINISHED (Tune's TERMINATED, a study's OK)
    ends = {r["trial"]: (status.get(r["status"], "FINISHED"), r.get("history", [])) for r in summary["rows"]}
    tracking.end_trials(campaign / TRIALS_DIR, ends)
    tracking.finish([], summary, [CONFIG_FILE, *files, *(location(p).name for p in summary["plots"])])


def error_reason(err: BaseException | None) -> str | None:
    if err is None:
        return None
    from imgcls_dist.errors import root_cause

    cause = getattr(err, "cause", None)  # RayTaskError -> the exception the trial raised
    if isinstance(cause, BaseException):
        err = cause
    if isinstance(err, (JobFailed, UserError)):
        msg = str(err)
    else:
        msg = root_cause(err)
    return " ".join(msg.split())[:500]


def collect_rows(cfg: ExperimentConfig, campaign: Location, grid) -> list[dict[str, Any]]:
    from imgcls_dist.tune.status import read_statuses

    keys = list(cfg.tune.space)
    # When every trial ended (the normal return of fit()), ResultGrid's counts say so; only an interrupted
    # campaign needs the per-trial record of which ones had ended.
    all_ended = grid.num_terminated + grid.num_errors == len(grid)
    statuses = {} if all_ended else read_statuses(campaign)
    rows = []
    for res in grid:
        name = Path(res.path).name
        history, best_dir, best = R.trial_history(campaign / TRIALS_DIR / name)
        metrics = res.metrics or {}
        seen = metrics.get("epochs_done")
        error = error_reason(res.error)
        status = "ERROR" if error is not None else "TERMINATED" if all_ended else statuses.get(name, "UNFINISHED")
        row: dict[str, Any] = {"trial": name, **{k: plain(res.config.get(k)) for k in keys}}
        row.update({
            "best_val_acc": best["val_acc"] if best else None,
            "val_loss": best["val_loss"] if best else None,
            "best_epoch": best["epoch"] if best else None,
            "final_val_acc": history[-1]["val_acc"] if history else None,
            "epochs_run": len(history),
            # Epochs Tune had seen when the trial ended; a stopped trial can train on for a moment
            # (reports reach Tune through the Train controller's poll), so epochs_run may be larger.
            "epochs_reported": int(seen) if seen is not None else 0,
            # ASHA's decision: a trial that ended without error before max_t epochs (as Tune saw them).
            "stopped_early": status == "TERMINATED" and seen is not None and int(seen) < cfg.train.epochs,
            "status": status,
            "error": error,
            "checkpoint": best_dir.uri if best_dir else None,
            "curve": [h["val_acc"] for h in history],
            "history": history,  # every epoch it trained: what its MLflow run must hold (finish_tracking)
        })
        rows.append(row)
    return rows


def finalize_campaign(cfg: ExperimentConfig, campaign: Location, grid, plan: dict, *, wall_s: float,
                      early_stopping: bool = True) -> dict[str, Any]:
    from imgcls_dist.tune.plots import plot_metric_vs_param, plot_trial_curves

    keys = list(cfg.tune.space)
    rows = collect_rows(cfg, campaign, grid)
    results_csv = R.write_results_csv(rows, keys, campaign / R.RESULTS_FILE)
    base = cfg.to_dict()

    def _with_base(key: str) -> list[dict]:  # unsearched knobs plot at their (constant) base value
        return rows if key in keys else [{**r, key: get_dotted(base, key)} for r in rows]

    plots = [
        plot_metric_vs_param(_with_base("train.lr"), "train.lr", campaign / "val_acc_vs_lr.png",
                             color_key="train.scheduler" if "train.scheduler" in keys else None, logx=True,
                             searched="train.lr" in keys),
        plot_metric_vs_param(_with_base("augment.strength"), "augment.strength", campaign / "val_acc_vs_strength.png",
                             color_key="augment.preset" if "augment.preset" in keys else None,
                             searched="augment.strength" in keys),
        plot_trial_curves({r["trial"]: r["curve"] for r in rows},
                          {r["trial"]: r["epochs_reported"] if r["stopped_early"] else None for r in rows},
                          campaign / "trial_curves.png", max_epochs=cfg.train.epochs,
                          rungs=asha_rungs(cfg) if early_stopping else None),
    ]
    ranked = [r for r in R.sort_rows(rows) if r["best_val_acc"] is not None]
    print("\n" + R.format_table(rows, keys), flush=True)
    unfinished = [r["trial"] for r in rows if r["status"] not in ("TERMINATED", "ERROR")]
    if unfinished:
        print(f"{len(unfinished)} trial(s) did not finish ({', '.join(unfinished)}): continue with --resume",
              flush=True)
    summary: dict[str, Any] = {
        "campaign_dir": campaign.uri,
        "results_csv": results_csv.uri,
        "plots": [p.uri for p in plots],
        "num_trials": len(rows),
        "errored": sum(r["status"] == "ERROR" for r in rows),
        "unfinished": len(unfinished),
        "stopped_early": sum(bool(r["stopped_early"]) for r in rows),
        "trial_epochs": sum(r["epochs_run"] for r in rows),
        "wall_s": round(wall_s, 2),
        "concurrency": plan["concurrency"],
        "workers_per_trial": plan["workers_per_trial"],
        "early_stopping": early_stopping,
        "rows": rows,
    }
    if not ranked:
        first = next((r["error"] for r in rows if r["error"]), "no trial produced a checkpoint")
        raise JobFailed(f"all {len(rows)} trials failed (results: {results_csv}); first error: {first}")
    best = ranked[0]
    best_cfg = R.best_config(base, best, keys, name=f"{cfg.run.name}_best", storage_path=cfg.run.storage_path,
                             num_workers=plan["workers_per_trial"])
    best_yaml = R.write_best_yaml(best_cfg, best, campaign / R.BEST_FILE)
    ens_path, members = R.write_ensemble(rows, cfg.tune.top_k, campaign, cfg.data.path, cfg.data.max_val_samples)
    summary.update({"best_trial": best["trial"], "best_val_acc": best["best_val_acc"],
                    "best_params": {k: best[k] for k in keys}, "best_config": best_yaml.uri,
                    "ensemble": ens_path.uri if ens_path else None, "ensemble_members": members})
    print(f"\nbest: {best['trial']} val_acc {best['best_val_acc']:.4f} "
          f"({', '.join(f'{k}={R.fmt(best[k])}' for k in keys)})\n"
          f"{len(rows)} trials ({summary['errored']} failed, {summary['stopped_early']} stopped early by ASHA), "
          f"{summary['trial_epochs']} trial-epochs, {wall_s:.0f}s", flush=True)
    return summary

