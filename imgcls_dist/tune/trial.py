"""What runs inside one Tune trial: build the trial's config and launch its Ray Train run.

A stopped trial (ASHA) needs no code here: Tune ends the trial's actor, the Train controller it launched
goes with it (an actor's actors share its fate), and Train's own PlacementGroupCleaner frees the run's
CPUs once it sees the controller gone. The cleaner looks through Ray's State API, which the dashboard
serves: that is why `ray_utils.ensure_ray` starts the local Ray with it (without it the CPUs leak and a
2-CPU campaign waits forever after two stopped trials, and the cleaner warns once a second).
"""

from __future__ import annotations

import os

from imgcls_dist.config import CONFIG_FILE, write_config
from imgcls_dist.storage import location
from imgcls_dist.train.job import build_trainer, fit, open_tracking, resolve_dataset, resolve_epochs
from imgcls_dist.train.state import load_history
from imgcls_dist.tune.report import EpochReportCallback
from imgcls_dist.tune.space import trial_config

# Train's controller polls workers for reports this often (default 2 s). ASHA acts on what the
# controller relays, so a slow poll lets a stopped trial train on; 0.5 s keeps the lag well under
# an epoch at almost no cost. An explicit environment setting wins.
HEALTH_CHECK_INTERVAL_S = "0.5"


def trial_driver(config: dict, base: dict | None = None, trials_dir: str = "", cwd: str | None = None,
                 num_workers: int = 1, use_gpu: bool = False, tracking=None) -> None:
    """One Tune trial = one Ray Train run; every epoch's report is relayed to Tune (runs in the trial's actor).
    tracking: the campaign run's train.tracked.Link with run.tracking: mlflow (the trial's run is its child)."""
    import ray.tune

    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", HEALTH_CHECK_INTERVAL_S)
    name = ray.tune.get_context().get_trial_name()
    cfg = trial_config(base or {}, config, name, trials_dir, cwd=cwd)  # paths as seen from the campaign's cwd
    ds = resolve_dataset(cfg)
    cfg = resolve_epochs(cfg, ds["train_rows"], num_workers)
    out = location(trials_dir) / name
    write_config(cfg, out / CONFIG_FILE)
    run = open_tracking(cfg, out, kind="trial", link=tracking)
    # JobFailed("training failed: <root cause>") marks the trial ERROR with that reason. An epoch goes to MLflow
    # before Tune hears of it: ASHA may end the trial's actor (and its Train controller) on hearing it. A trial
    # that fails or that ASHA stops does not end its MLflow run here (a stop can reach this code as an error
    # too): the campaign ends it as Tune ended the trial (tune/campaign.py, finish_tracking).
    result = fit(build_trainer(cfg, ds, num_workers, use_gpu,
                               callbacks=[*(run.callbacks() if run else []), EpochReportCallback()]))
    if run:
        history = _history(result)
        run.finish(history, {"best_val_acc": max((h["val_acc"] for h in history), default=None)}, [CONFIG_FILE])


def _history(result) -> list[dict]:
    """The trial's epochs, for its MLflow run's last sync; none when unreadable (the trial itself succeeded)."""
    try:
        with result.checkpoint.as_directory() as d:
            return load_history(d)
    except Exception:  # noqa: BLE001 - the epochs logged as they ended stay; only a lost one stays lost
        return []
