"""The MLflow side of a training run, a campaign or a study (`run.tracking: mlflow`; docs/design.md, "Experiment
tracking"). Imported only with tracking on (train/job.py, `open_tracking`), so MLflow stays optional.

A run's MLflow run gets: the resolved config as params (when it is first opened), each epoch's metrics from the
Train controller as the epoch ends (tracking/train_callback.py), then from the process that ran `fit`: every epoch
the server still lacks (from the run's own history), the final metrics, copies of the run's files, and its end
status. A campaign's or study's run is the parent of its trials' runs (`link`).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

from imgcls_dist.config import ExperimentConfig
from imgcls_dist.errors import Stopped
from imgcls_dist.storage import Location
from imgcls_dist.tracking.logger import Notice
from imgcls_dist.tracking.params import flatten
from imgcls_dist.tracking.runs import TrackedRun, new_notice, open_run
from imgcls_dist.tracking.server import apply_env, mlflow_env
from imgcls_dist.tracking.train_callback import MlflowEpochCallback
from imgcls_dist.train.state import MID_EPOCH

EPOCH_METRICS = ("train_loss", "train_acc", "val_loss", "val_acc", "lr", "images_per_s")
# Logged once, at step 0: distinct from the epoch metrics' names, so no step of theirs is logged twice.
FINAL_METRICS = ("test_acc", "test_balanced_acc", "best_val_acc", "final_val_acc")
# MLflow's client prints two lines with links (run, experiment) whenever it ends a run: once for a campaign, not
# once per trial on the campaign's console. A user's own setting wins.
QUIET_TRIALS = {"MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}


@dataclass(frozen=True)
class Link:
    """What a trial's process needs of its campaign's run: the parent, the command's notice, and the driver's
    MLflow settings (a Tune trial's actor runs anywhere on a cluster, without the driver's environment)."""

    parent_id: str
    notice: Notice
    env: dict[str, str]


def epoch_steps(history: list[dict[str, Any]]) -> list[tuple[int, dict[str, float]]]:
    """A run's history (history.json, metrics.csv's rows) as (step, metrics) pairs, as the controller logs them."""
    return [(h["epoch"], {k: h[k] for k in EPOCH_METRICS if k in h}) for h in history]


def start(cfg: ExperimentConfig, out: Location, kind: str, link: Link | None = None) -> Tracking | None:
    """The run's MLflow run, opened or continued; None when the server does not take it (said once): the job
    goes on untracked, its files complete."""
    if link is not None:
        apply_env(link.env)
    notice = link.notice if link else new_notice(out)
    try:
        run_id = open_run(out, cfg.run.name, kind, flatten(cfg.to_dict()), link.parent_id if link else None)
    except Exception as e:  # noqa: BLE001 - the preflight passed; a server lost since costs the tracking only
        notice.say(e, out.uri)
        return None
    return Tracking(TrackedRun(run_id, out, notice))


class Tracking:
    """One job's MLflow run (a train run, a trial, a campaign, a study) through the job's life."""

    def __init__(self, run: TrackedRun):
        self.run = run

    def callbacks(self) -> list:
        """For the run's TorchTrainer: each epoch logged from the Train controller."""
        r = self.run
        return [MlflowEpochCallback(r.run_id, r.run_dir.uri, r.notice, mlflow_env(), EPOCH_METRICS, MID_EPOCH)]

    def link(self) -> Link:
        return Link(self.run.run_id, self.run.notice, {**QUIET_TRIALS, **mlflow_env()})

    @contextmanager
    def ending(self) -> Iterator[None]:
        """A job that stops (SIGTERM, Ctrl-C) ends its run KILLED, one that fails FAILED; a run that resumes goes
        back to RUNNING (tracking/runs.py)."""
        try:
            yield
        except (Stopped, KeyboardInterrupt):
            self.run.end("KILLED")
            raise
        except BaseException:
            self.run.end("FAILED")
            raise

    def end_trials(self, trials_dir: Location, trials: dict[str, tuple[str, list[dict[str, Any]]]]) -> None:
        """A campaign's trials' runs still RUNNING (a trial ends its own run only when it succeeds: one ASHA stopped
        had its actor ended, one failed, one was cut short by the driver's end), by trial name: the epochs of its
        history the server lacks (e.g. those it trained while ASHA's stop travelled), then the given status."""
        for name, (status, history) in trials.items():
            trial = self.run.recorded(trials_dir / name)
            if trial is not None:
                trial.log_steps(epoch_steps(history))
                trial.end_on_behalf(status)

    def finish(self, history: list[dict[str, Any]], final: dict[str, Any], artifacts: Iterable[str]) -> None:
        """Every epoch the server lacks, the final metrics, copies of the files, FINISHED."""
        self.run.log_steps(epoch_steps(history))
        numbers = {k: final[k] for k in FINAL_METRICS if isinstance(final.get(k), (int, float))}
        if numbers:
            self.run.log_steps([(0, numbers)])
        self.run.log_artifacts(artifacts)
        self.run.end("FINISHED")
