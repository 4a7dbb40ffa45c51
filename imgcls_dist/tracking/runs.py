"""An MLflow run beside a run directory: opened (or continued) when the job starts, given final metrics and copies
of the run's files at the end, and ended with the job's outcome.

The run id lives in the run directory (`RUN_ID_FILE`), so the same command again on the same directory (a
resume) continues the same MLflow run: it goes back to RUNNING, its params stay as first logged, and steps it
already holds are not logged again (logger.py). Everything after the start is best effort: the server going
away costs the copies on the server, never the job or its files. Contract: docs/design.md, "Experiment tracking".
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from typing import Iterable

from imgcls_dist.storage import Location
from imgcls_dist.tracking.logger import Notice, RunLogger
from imgcls_dist.tracking.params import batches
from imgcls_dist.tracking.server import client, tracking_uri

RUN_ID_FILE = "mlflow_run.json"
NOTICE_FILE = ".mlflow_unreachable"  # logger.Notice's marker, in the command's top run directory
RUN_DIR_TAG = "imgcls.run_dir"
KIND_TAG = "imgcls.kind"  # train, tune, study, trial
PARENT_TAG = "mlflow.parentRunId"  # MLflow's own tag: the UI nests a trial's run under its campaign's


def experiment_id(c) -> str:
    """MLflow's own choice: MLFLOW_EXPERIMENT_ID, else MLFLOW_EXPERIMENT_NAME (made if it does not exist yet),
    else the server's default experiment."""
    if os.environ.get("MLFLOW_EXPERIMENT_ID"):
        return os.environ["MLFLOW_EXPERIMENT_ID"]
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME")
    if not name:
        return "0"  # mlflow.entities.Experiment.DEFAULT_EXPERIMENT_ID
    found = c.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return c.create_experiment(name)
    except Exception:  # noqa: BLE001 - a concurrent trial made it first
        return c.get_experiment_by_name(name).experiment_id


def recorded_run_id(run_dir: Location) -> str | None:
    f = run_dir / RUN_ID_FILE
    return json.loads(f.read_text())["run_id"] if f.is_file() else None


def _continued(c, run_dir: Location) -> str | None:
    """The run recorded in `run_dir`, when this server still has it (not deleted): back to RUNNING."""
    from mlflow.exceptions import MlflowException

    run_id = recorded_run_id(run_dir)
    if run_id is None:
        return None
    try:
        run = c.get_run(run_id)
    except MlflowException as e:
        if e.error_code == "RESOURCE_DOES_NOT_EXIST":  # another server, or deleted for good: a new run
            return None
        raise
    if run.info.lifecycle_stage == "deleted":
        return None
    c.update_run(run_id, status="RUNNING")
    return run_id


def open_run(run_dir: Location, name: str, kind: str, params: dict[str, str], parent_id: str | None = None) -> str:
    """The run id for `run_dir`: the recorded one continued, else a new run (in the parent's experiment for a
    trial) with its params, recorded in `run_dir` after the params, so a recorded run always has them."""
    from mlflow.entities import Param

    c = client()
    run_id = _continued(c, run_dir)
    if run_id is not None:
        return run_id
    exp = c.get_run(parent_id).info.experiment_id if parent_id else experiment_id(c)
    tags = {RUN_DIR_TAG: run_dir.uri, KIND_TAG: kind, **({PARENT_TAG: parent_id} if parent_id else {})}
    run_id = c.create_run(exp, run_name=name, tags=tags).info.run_id
    for batch in batches(params):
        c.log_batch(run_id, params=[Param(k, v) for k, v in batch.items()])
    (run_dir / RUN_ID_FILE).write_text(json.dumps({"run_id": run_id, "tracking_uri": tracking_uri()}) + "\n")
    return run_id


@dataclass
class TrackedRun:
    """An open MLflow run and where its files are; every method is best effort (the notice says a failure)."""

    run_id: str
    run_dir: Location
    notice: Notice

    def logger(self) -> RunLogger:
        return RunLogger(self.run_id, self.run_dir.uri, self.notice)

    def log_steps(self, rows: Iterable[tuple[int, dict[str, float]]]) -> None:
        """Steps the server lacks, e.g. every epoch of the run's history at the end (a lost epoch comes back)."""
        log = self.logger()
        for step, metrics in rows:
            log.pending[int(step)] = {k: float(v) for k, v in metrics.items()}
        log.flush()

    def log_artifacts(self, names: Iterable[str]) -> None:
        """Copies of the run directory's files of these names that exist (a remote one through a local copy)."""
        try:
            c = client()
            with tempfile.TemporaryDirectory() as tmp:
                for name in names:
                    f = self.run_dir / name
                    if f.is_file():
                        c.log_artifact(self.run_id, f.local_copy(tmp))
        except Exception as e:  # noqa: BLE001 - the files stay in the run directory
            self.notice.say(e, self.run_dir.uri)

    def end(self, status: str) -> None:
        """FINISHED, FAILED or KILLED (MLflow's RunStatus names)."""
        try:
            client().set_terminated(self.run_id, status=status)
        except Exception as e:  # noqa: BLE001
            self.notice.say(e, self.run_dir.uri)

    def recorded(self, run_dir: Location) -> TrackedRun | None:
        """The run recorded in another run directory (a trial's) while it is still RUNNING: its own process ended
        without ending it."""
        try:
            run_id = recorded_run_id(run_dir)
            if run_id and client().get_run(run_id).info.status == "RUNNING":
                return TrackedRun(run_id, run_dir, self.notice)
        except Exception as e:  # noqa: BLE001
            self.notice.say(e, self.run_dir.uri)
        return None

    def end_on_behalf(self, status: str) -> None:
        """`end` for a run whose own process is gone: its end time stays unset (when that process ended is not
        known here), and update_run, unlike set_terminated, prints no links on this (a campaign's) console."""
        try:
            client().update_run(self.run_id, status=status)
        except Exception as e:  # noqa: BLE001
            self.notice.say(e, self.run_dir.uri)


def new_notice(top_dir: Location) -> Notice:
    """One command's notice, its marker in the command's top directory (a run's, a campaign's)."""
    return Notice((top_dir / NOTICE_FILE).uri)
