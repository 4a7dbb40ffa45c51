"""What a job's console shows beside our own lines: Ray's pure noise filtered here, in one place.

Every other warning stays: it may tell the user something. Filtered, with the reason (filters sit on the
emitting loggers, so they hold however Ray sets up its handlers; a renamed logger only lets its line back in):

* Ray's token-auth notice ("Token authentication is enabled for this Ray cluster"): printed on every
  `ray.init` of Ray 2.60 when a token exists; for the private local instance a job starts, token auth
  is simply on.
* Ray Data's "Progress bars disabled" (our choice when stderr is not a terminal) and its "cluster currently
  does not have any available CPUs" check, which samples a resource view that lags the shutdown of the
  previous job's actors; our pool sizing guarantees CPUs for the tasks (`infer.pipeline.plan_actors`).

Tracebacks kept off the console, the warning line kept (`quiet_ray_workers`, in every process of the job):

* Train's "Failed to send/cancel resource request" to its AutoscalingCoordinator actor: the call times out
  after 5 s when the 2-CPU machine is busy (the actor is a fresh process), Ray's own message says it is
  safe to ignore when transient, and it logs a 20-line Ray-internal traceback with it (seen in CI).

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


# logger -> message prefixes whose traceback says nothing to the user; the one-line warning still shows.
NO_TRACEBACK: dict[str, tuple[str, ...]] = {
    "ray.train.v2._internal.execution.scaling_policy.autoscaling_coordinator_client": (
        "Failed to send resource request", "Failed to cancel resource request"),
}


class DropTraceback(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        if record.getMessage().startswith(self.prefixes):
            record.exc_info, record.exc_text = None, None
        return True


def _install(filters: dict[str, tuple[str, ...]], kind: type[logging.Filter]) -> None:
    for name, prefixes in filters.items():
        log = logging.getLogger(name)
        if not any(isinstance(f, kind) for f in log.filters):
            log.addFilter(kind(prefixes))


def quiet_ray_workers() -> None:
    """Ray's `worker_process_setup_hook` for the job's processes (Train's controller logs there)."""
    _install(NO_TRACEBACK, DropTraceback)


def quiet_ray_console() -> None:
    """Install the driver's filters (idempotent)."""
    _install(NOISE, NoiseFilter)
    quiet_ray_workers()
