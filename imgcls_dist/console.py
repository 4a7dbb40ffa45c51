"""What a job's console shows beside our own lines: Ray's pure noise filtered here, in one place.

Every other warning stays: it may tell the user something. Filtered, with the reason (filters sit on the
emitting loggers, so they hold however Ray sets up its handlers; a renamed logger only lets its line back in):

* Ray's token-auth notice ("Token authentication is enabled for this Ray cluster"): printed on every
  `ray.init` of Ray 2.60 when a token exists; for the private local instance a job starts, token auth
  is simply on.
* Ray Data's "Progress bars disabled" (our choice when stderr is not a terminal) and its "cluster currently
  does not have any available CPUs" check, which samples a resource view that lags the shutdown of the
  previous job's actors; our pool sizing guarantees CPUs for the tasks (`infer.pipeline.plan_actors`).

Causes are removed where we can: Train's PlacementGroupCleaner warned once a second when the State API
was missing, so the local Ray starts with it (`ray_utils.ensure_ray`).
"""

from __future__ import annotations

import logging

NOISE: dict[str, tuple[str, ...]] = {
    "ray._private.authentication.authentication_token_setup": ("Token authentication is enabled for this Ray cluster",),
    "ray.data._internal.progress": ("Progress bars disabled",),
    "ray.data.dataset": ("Warning: The Ray cluster currently does not have any available CPUs",),
    "ray.data._internal.execution.streaming_executor": (
        "Warning: The Ray cluster currently does not have any available CPUs",),
}


class NoiseFilter(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)


def quiet_ray_console() -> None:
    """Install the filters (idempotent)."""
    for name, prefixes in NOISE.items():
        log = logging.getLogger(name)
        if not any(isinstance(f, NoiseFilter) for f in log.filters):
            log.addFilter(NoiseFilter(prefixes))
