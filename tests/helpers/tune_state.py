"""What a Tune experiment's snapshot says of its trials: what `--resume` will restore."""

from __future__ import annotations

import json
from pathlib import Path


def trial_states(experiment_dir: Path) -> dict[str, str]:
    """trial name -> status from Tune's experiment snapshot (written every few seconds while running)."""
    out = {}
    for f in experiment_dir.glob("experiment_state-*.json"):
        try:
            doc = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError):
            continue  # being rewritten
        for state, _meta in doc.get("trial_data", []):
            t = json.loads(state) if isinstance(state, str) else state
            name = t.get("custom_trial_name") or t.get("trial_id")
            out[str(name)] = t.get("status")
    return out
