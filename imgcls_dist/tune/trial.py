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
from imgcls_dist.train.job import build_trainer, fit, resolve_dataset, resolve_epochs
from imgcls_dist.tune.report import EpochReportCallback
from imgcls_dist.tune.space import trial_config

# Train's controller polls workers for reports this often (default 2 s). ASHA acts on what the
# controller relays, so a slow poll lets a stopped trial train on; 0.5 s keeps the lag well under
# an epoch at almost no cost. An explicit environment setting wins.
HEALTH_CHECK_INTERVAL_S = "0.5"


def trial_driver(config: dict, base: dict | None = None, trials_dir: str = "", cwd: str | None = None,
                 num_workers: int = 1, use_gpu: bool = False) -> None:
    """One Tune trial = one Ray Train run; every epoch's report is relayed to Tune (runs in the trial's actor)."""
    import ray.tune

    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", HEALTH_CHECK_INTERVAL_S)
    name = ray.tune.get_context().get_trial_name()
    cfg = trial_config(base or {}, config, name, trials_dir, cwd=cwd)  # paths as seen from the campaign's cwd
    ds = resolve_dataset(cfg)
    cfg = resolve_epochs(cfg, ds["train_rows"], num_workers)
    write_config(cfg, location(trials_dir) / name / CONFIG_FILE)
    # JobFailed("training failed: <root cause>") marks the trial ERROR with that reason.
    fit(build_trainer(cfg, ds, num_workers, use_gpu, callbacks=[EpochReportCallback()]))
