"""User-facing errors: the CLI prints them as one line and exits 2, no traceback."""

import re

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class UserError(Exception):
    """Bad input from the user (file, column, config key...). Message is one line, names the culprit."""

    exit_code = 2


class JobFailed(Exception):
    """A job ran and failed for a reason that is not bad input (diverged loss, worker crash...)."""

    exit_code = 1


class Stopped(JobFailed):
    """A job asked to stop (SIGTERM) that stopped at a safe point with its work so far written; running the
    same command again continues it. Exit status 143, as for a process ended by SIGTERM."""

    exit_code = 143


def root_cause(e: BaseException, limit: int = 300) -> str:
    """One line for a failure that Ray wrapped (Train's worker_failures, TaskError chains, Data's
    remote tracebacks): follow the chain to the original exception; its text's last line names it."""
    seen = e
    while seen.__cause__ is not None or getattr(seen, "worker_failures", None):
        wf = getattr(seen, "worker_failures", None)
        seen = next(iter(wf.values())) if wf else seen.__cause__  # type: ignore[assignment]
    lines = [ln.strip() for ln in _ANSI.sub("", str(seen)).splitlines() if ln.strip()]
    # Ray's remote tracebacks end with "ExceptionType: message"; that last line is what the user needs.
    return (lines[-1] if lines else type(seen).__name__)[:limit]
