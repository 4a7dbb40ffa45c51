"""`--mlflow-run RUN_ID|new` of `ensemble build`, `infer` and `evaluate`: the files a command wrote and its key
numbers, copied to an MLflow run once the command is done (the files themselves stay where the command wrote
them). `preflight` runs before any work, so a server that is down or an unknown run costs nothing."""

from __future__ import annotations

import math
import tempfile
import time
from typing import Iterable

from imgcls_dist.errors import UserError
from imgcls_dist.storage import PathLike, location
from imgcls_dist.tracking.server import check_server, client, first_line

NEW = "new"
OPTION = "--mlflow-run"
OPTION_HELP = ("log this command's report files and key metrics to that MLflow run, or to a new run with 'new' "
               "(its id is printed); the server is MLFLOW_TRACKING_URI")
COMMAND_TAG = "imgcls.command"


def add_mlflow_run_arg(p) -> None:
    p.add_argument(OPTION, dest="mlflow_run", default=None, metavar="RUN_ID", help=OPTION_HELP)


def preflight(run: str | None, command: str) -> str | None:
    """Before any work: the server answers and an existing RUN_ID is there (not deleted). Returns `run`."""
    if run is None:
        return None
    what = f"{command} {OPTION}"
    check_server(what)
    if run != NEW:
        try:
            found = client(what).get_run(run)
        except Exception as e:  # noqa: BLE001 - MlflowException: no such run
            raise UserError(f"{what}: no MLflow run {run!r} ({first_line(e)}); give a run id, or 'new'") from None
        if found.info.lifecycle_stage == "deleted":
            raise UserError(f"{what}: MLflow run {run!r} is deleted; give another run id, or 'new'")
    return run


def _new_run(c, command: str) -> str:
    from imgcls_dist.tracking.runs import experiment_id

    return c.create_run(experiment_id(c), run_name=command, tags={COMMAND_TAG: command}).info.run_id


def log_report(run: str | None, command: str, files: Iterable[PathLike],
               metrics: dict[str, float | None]) -> str | None:
    """The files (any filesystem) under the run's artifact directory PREFIX, and the metrics as `PREFIX/<key>`
    (the MLflow UI groups them by that prefix), PREFIX being the command's first word (`ensemble build` ->
    `ensemble`). `run`: what `preflight` returned; None logs nothing. A new run is made here (so a command that
    fails leaves none), ended FINISHED, and its id printed. Returns the run id."""
    if run is None:
        return None
    from mlflow.entities import Metric

    prefix = command.split()[0]
    c = client(f"{command} {OPTION}")
    now = int(time.time() * 1000)
    try:
        run_id = _new_run(c, command) if run == NEW else run
        logged = [Metric(f"{prefix}/{k}", float(v), now, 0) for k, v in metrics.items()
                  if v is not None and math.isfinite(v)]  # an undefined number (no rows) is left out
        c.log_batch(run_id, metrics=logged)
        _log_files(c, run_id, prefix, files)
        if run == NEW:
            c.set_terminated(run_id)
    except Exception as e:  # noqa: BLE001 - the command's own files are written; only the copies are missing
        raise UserError(f"{command} {OPTION}: the reports are written, but logging them to MLflow failed "
                        f"({first_line(e)})") from None
    print(f"{command}: logged to {'a new ' if run == NEW else ''}MLflow run {run_id}")
    return run_id


def _log_files(c, run_id: str, artifact_dir: str, files: Iterable[PathLike]) -> None:
    """A remote file goes through a local copy: MLflow logs local files only."""
    with tempfile.TemporaryDirectory() as tmp:
        for f in map(location, files):
            c.log_artifact(run_id, f.local_copy(tmp), artifact_dir)
