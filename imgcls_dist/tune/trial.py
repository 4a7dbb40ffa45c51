"""What runs inside one Tune trial: build the trial's config, launch its Ray Train run, stop it cleanly.

Why a clean stop needs code here: when ASHA stops a trial, Tune ends the trial's actor. The Train
controller that actor launched is fate-shared with it and dies on the spot, taking the workers with
it - but the workers' placement group belongs to the *job*, so its CPUs stay reserved until the
driver exits. Ray Train relies on a detached `PlacementGroupCleaner` that finds dead controllers
through the State API; without the dashboard (our local mode: `include_dashboard=False`) or with two
local Ray instances on one host, that lookup fails, the CPUs leak, and after two stopped trials a
2-CPU campaign waits forever for workers. So the trial stops its Train run the way Ctrl-C does:

* `_GracefulStop` (a Tune function-trainable mixin, via `__mixins__`) runs first in the trial's
  `cleanup()`: it touches a per-trial stop file and waits until `fit()` has returned;
* `_StopWatcher`, a Train controller callback, sees the file within 0.1 s and calls the controller's
  own `abort()` - workers stopped, placement group removed, cleaner actor stopped, controller exits.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import ray

from imgcls_dist.config import write_config

CONFIG_FILE = "config.yaml"
STOP_FILE = ".stop_requested"
# How long a stopping trial waits for its Train run to shut down before Tune ends it anyway.
STOP_TIMEOUT_S = float(os.environ.get("IMGCLS_TUNE_STOP_TIMEOUT_S", "60"))
# Train's controller polls workers for reports this often (default 2 s). ASHA acts on what the
# controller relays, so a slow poll lets a stopped trial train on; 0.5 s keeps the lag well under
# an epoch at almost no cost. An explicit environment setting wins.
HEALTH_CHECK_INTERVAL_S = "0.5"

# One trial per actor process (reuse_actors=False): the running trial's stop file and "fit returned".
_ACTIVE: dict[str, Any] = {"stop_file": None, "done": None}

try:  # Ray internal (2.4x+ Train V2); without it stopped trials fall back to Ray's own cleanup
    from ray.train.v2._internal.execution.callback import ControllerCallback as _ControllerCallback
except ImportError:  # pragma: no cover
    _ControllerCallback = None  # type: ignore[assignment,misc]


if _ControllerCallback is not None:

    class _StopWatcher(_ControllerCallback):
        """Runs in the Train controller: abort the run gracefully once the trial asks it to stop."""

        def __init__(self, stop_file: str, interval_s: float = 0.1):
            self.stop_file = stop_file
            self.interval_s = interval_s

        def after_controller_start(self, train_run_context) -> None:
            controller = ray.get_runtime_context().current_actor
            stop_file, interval = self.stop_file, self.interval_s

            def watch():
                while not os.path.exists(stop_file):
                    time.sleep(interval)
                controller.abort.remote()

            threading.Thread(target=watch, name="tune-stop-watcher", daemon=True).start()


class _GracefulStop:
    """Mixin for the trial's FunctionTrainable: stop the Train run before Tune ends this actor."""

    def cleanup(self):
        stop_file, done = _ACTIVE["stop_file"], _ACTIVE["done"]
        if stop_file is not None and done is not None and not done.is_set():
            try:
                Path(stop_file).touch()
            except OSError:
                pass
            done.wait(timeout=STOP_TIMEOUT_S)
        super().cleanup()  # type: ignore[misc]


def trial_driver(config: dict, base: dict | None = None, trials_dir: str = "", cwd: str | None = None,
                 num_workers: int = 1, use_gpu: bool = False, fault: dict | None = None) -> None:
    """One Tune trial = one Ray Train run; every epoch's report is relayed to Tune (runs in the trial's actor)."""
    import ray.tune

    from imgcls_dist.errors import JobFailed
    from imgcls_dist.train.job import build_trainer, fit, resolve_dataset
    from imgcls_dist.tune.campaign import fault_for, trial_config
    from imgcls_dist.tune.report import EpochReportCallback

    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", HEALTH_CHECK_INTERVAL_S)
    if len([n for n in ray.nodes() if n.get("Alive")]) == 1:
        # Single node (local mode): no other node can be preempted, and the watcher is one more
        # Python process per trial - real cost on a 2-CPU laptop. Clusters keep Train's default.
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    name = ray.tune.get_context().get_trial_name()
    cfg = trial_config(base or {}, config, name, trials_dir, cwd=cwd)  # paths as seen from the campaign's cwd
    ds = resolve_dataset(cfg)
    run_dir = Path(trials_dir) / name
    run_dir.mkdir(parents=True, exist_ok=True)
    write_config(cfg, run_dir / CONFIG_FILE)
    stop_file = run_dir / STOP_FILE
    stop_file.unlink(missing_ok=True)  # a stale request from an earlier, killed driver
    callbacks: list = [EpochReportCallback()]
    if _ControllerCallback is not None:
        callbacks.append(_StopWatcher(str(stop_file)))
    done = threading.Event()
    _ACTIVE.update(stop_file=str(stop_file), done=done)
    trainer = build_trainer(cfg, ds, num_workers, use_gpu, fault=fault_for(fault, config), callbacks=callbacks)
    try:
        fit(trainer)  # JobFailed("training failed: <root cause>") marks the trial ERROR with that reason
    except JobFailed:
        if stop_file.exists():
            return  # we aborted it because Tune stopped the trial: not a failure
        raise
    finally:
        done.set()
        _ACTIVE.update(stop_file=None, done=None)
        stop_file.unlink(missing_ok=True)


trial_driver.__mixins__ = (_GracefulStop,)  # type: ignore[attr-defined]
