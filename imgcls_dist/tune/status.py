"""Each trial's final Tune status (TERMINATED or ERROR), recorded by a public Tune `Callback` as trials end.

`ResultGrid` exposes each trial's error and how many trials ended, but not which ones: when a campaign is
interrupted (Ctrl-C) the results must still say which trials had finished. So the statuses are written to
`<campaign>/trial_status.json` as each trial ends (Tune pickles the callback with its state and brings it
back on `--resume`). A trial with neither a status nor an error did not finish.
"""

from __future__ import annotations

import json
from typing import Any, Callable

from ray.tune import Callback

from imgcls_dist.errors import UserError
from imgcls_dist.storage import Location

STATUS_FILE = "trial_status.json"


def trial_name(trial) -> str:
    """`trial_00003`: the counter of Tune's trial id; stable across resume (names the Train run too)."""
    return f"trial_{trial.trial_id.rsplit('_', 1)[-1]}"


def read_statuses(campaign: Location) -> dict[str, str]:
    try:
        return json.loads((campaign / STATUS_FILE).read_text())
    except (UserError, json.JSONDecodeError):
        return {}


class TrialStatusLog(Callback):
    """Runs in the Tune driver's event loop (one thread). Tune pickles it with the experiment state and
    `Tuner.restore` brings that copy back: unpickling re-reads the file, which is the truth."""

    def __init__(self, campaign: Location, name_of: Callable[[Any], str] = trial_name):
        self.campaign, self.name_of = campaign, name_of  # name_of: the campaign's trial_name_creator
        self.statuses = read_statuses(campaign)

    def __getstate__(self) -> dict:
        return {"campaign": self.campaign, "name_of": self.name_of}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["campaign"], state.get("name_of", trial_name))

    def _record(self, trial, status: str) -> None:
        self.statuses[self.name_of(trial)] = status
        (self.campaign / STATUS_FILE).write_text(json.dumps(self.statuses, indent=1, sort_keys=True))

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._record(trial, "TERMINATED")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._record(trial, "ERROR")
