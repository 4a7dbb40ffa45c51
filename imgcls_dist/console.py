"""What a job's console shows beside our own lines: Ray's pure noise filtered here, in one place.

Every other warning stays. `quiet_ray_console` installs the driver's filters, `quiet_ray_workers` those of every
process of the job; filters sit on the emitting loggers. What is filtered and why: docs/design.md,
"Console output".
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
