"""Each epoch of a Ray Train run into its MLflow run, from the Train controller.

`after_report` runs in the controller once every worker has reported and the checkpoint is persisted, with the
workers' metrics in rank order: rank 0's (`metrics[0]`) are logged, so an epoch is logged once, however many
workers, and only once its checkpoint is safe. The controller is a Ray actor, on a cluster on any node, and
does not inherit the driver's environment: the callback carries the driver's MLflow settings (`env`) and
applies them before it first logs. Nothing raises out of `after_report`: an exception there would fail the
training run, and tracking must never cost training.
"""

from __future__ import annotations

from typing import Any, Optional

from ray.train import UserCallback

from imgcls_dist.tracking.logger import Notice, RunLogger
from imgcls_dist.tracking.server import apply_env


class MlflowEpochCallback(UserCallback):
    """run_id/run_dir: the run to log to; keys: the epoch metrics to log (step: the report's `epoch`); skip_key:
    a report carrying it is no epoch (a mid-epoch checkpoint's) and is not logged."""

    def __init__(self, run_id: str, run_dir: str, notice: Notice, env: dict[str, str], keys: tuple[str, ...],
                 skip_key: str):
        self.run_id, self.run_dir, self.notice, self.env = run_id, run_dir, notice, env
        self.keys, self.skip_key = keys, skip_key
        self._logger: RunLogger | None = None  # made in the controller, on first use

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint: Optional[Any]) -> None:
        try:
            m = metrics[0] if metrics else {}
            if "epoch" not in m or m.get(self.skip_key):
                return
            self._log().log_step(int(m["epoch"]), {k: m[k] for k in self.keys if k in m})
        except Exception as e:  # noqa: BLE001 - see the module docstring
            self.notice.say(e, self.run_dir)

    def _log(self) -> RunLogger:
        if self._logger is None:
            apply_env(self.env)
            self._logger = RunLogger(self.run_id, self.run_dir, self.notice)
        return self._logger
