"""Metrics of one MLflow run that survive the server going away: each step is logged once, a step the server did
not take is kept and sent again with the next one (and at the end), and the loss is said once on the console.

The run's own files stay the source of truth (the driver sends every epoch of metrics.csv again at the end), so
nothing here may stop training: every MLflow error is caught, kept and said.
"""

from __future__ import annotations

import sys
import time
import uuid
from dataclasses import dataclass, field

from imgcls_dist.storage import location
from imgcls_dist.tracking.server import client, first_line, tracking_uri


@dataclass
class Notice:
    """Says that the server was lost, once per command however many processes log (the driver, Train
    controllers, Tune trials): the first to say it writes the command's token into `file` (beside the runs it
    tracks), and a process that finds its token there stays quiet. A new command has a new token, so it says
    it again."""

    file: str
    token: str = field(default_factory=lambda: uuid.uuid4().hex)
    spoken: bool = False  # by this process (or found said): no more reads of the marker

    def said(self) -> bool:
        try:
            f = location(self.file)
            self.spoken = self.spoken or (f.is_file() and f.read_text() == self.token)
        except Exception:  # noqa: BLE001 - the marker is a courtesy: unreadable means not said
            pass
        return self.spoken

    def say(self, error: BaseException, run_dir: str) -> None:
        if self.spoken or self.said():
            return
        self.spoken = True
        print(f"warning: MLflow tracking at {tracking_uri()} failed ({first_line(error)}); metrics are kept and "
              f"sent again later; the run's files in {run_dir} stay complete", file=sys.stderr, flush=True)
        try:
            location(self.file).write_text(self.token)
        except Exception:  # noqa: BLE001 - at worst another process says it too
            pass


class RunLogger:
    """Logs (step, metrics) pairs to one run. A pair whose first key the server already holds at that step is
    skipped (a resumed run, Train's restart, a retry whose first try landed after all): one `log_batch` request
    is one transaction, so that one key stands for the whole step."""

    def __init__(self, run_id: str, run_dir: str, notice: Notice):
        self.run_id, self.run_dir, self.notice = run_id, run_dir, notice
        self.pending: dict[int, dict[str, float]] = {}
        self.logged: dict[str, set[int]] = {}  # key -> steps on the server, read once per key

    def log_step(self, step: int, metrics: dict[str, float]) -> bool:
        if metrics:
            self.pending[int(step)] = {k: float(v) for k, v in metrics.items()}
        return self.flush()

    def flush(self) -> bool:
        """Send what is pending, oldest step first; False (and the notice) when the server did not take it."""
        try:
            self._send()
            return True
        except Exception as e:  # noqa: BLE001 - connection refused, timeouts, 5xx: all mean "later"
            self.logged.clear()  # a request that timed out may have landed: read again before resending
            self.notice.say(e, self.run_dir)
            return False

    def _send(self) -> None:
        from mlflow.entities import Metric

        c = client()
        for step in sorted(self.pending):
            metrics = self.pending[step]
            first = sorted(metrics)[0]
            if step not in self._steps(c, first):
                now = int(time.time() * 1000)
                c.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in sorted(metrics.items())])
                self.logged[first].add(step)
            del self.pending[step]

    def _steps(self, c, key: str) -> set[int]:
        if key not in self.logged:
            self.logged[key] = {m.step for m in c.get_metric_history(self.run_id, key)}
        return self.logged[key]
