"""A config as MLflow params: nested sections flattened to dotted keys (`train.lr`), values as text within
MLflow's limits, in batches of the size one `log_batch` request takes."""

from __future__ import annotations

import json
import re
from typing import Any, Iterator

# MLflow's own limits (mlflow/utils/validation.py): a longer value or a larger batch is refused by the server,
# and one refused param would lose the whole batch.
MAX_VALUE_LENGTH = 6000
MAX_KEY_LENGTH = 250
MAX_PARAMS_PER_BATCH = 100
ELLIPSIS = "..."
# What MLflow takes in a param name (validate_param_and_metric_name); user-named keys (study arms, tune.space
# keys) may hold other characters, and one bad name would refuse the whole batch.
_NOT_IN_A_NAME = re.compile(r"[^/\w.\- :]")


def param_value(value: Any) -> str:
    """Text as a user would write it in YAML/JSON (`true`, `null`, `[1, 16]`), cut to MLflow's limit."""
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    if len(text) > MAX_VALUE_LENGTH:
        text = text[: MAX_VALUE_LENGTH - len(ELLIPSIS)] + ELLIPSIS
    return text


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """{"train": {"lr": 0.1}} -> {"train.lr": "0.1"}; an empty dict stays one param (`{}`), so every config
    key is visible; lists are values, not sections."""
    flat: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, prefix=f"{name}."))
        else:
            flat[_NOT_IN_A_NAME.sub("_", name)[:MAX_KEY_LENGTH]] = param_value(value)
    return flat


def batches(params: dict[str, str], size: int = MAX_PARAMS_PER_BATCH) -> Iterator[dict[str, str]]:
    items = sorted(params.items())
    for i in range(0, len(items), size):
        yield dict(items[i: i + size])
