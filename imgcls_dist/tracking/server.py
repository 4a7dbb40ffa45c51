"""Reaching the MLflow tracking server: the client, its retry policy, and the check every job makes before any
work (a server that is down or refuses the credentials stops the job with one line, exit 2)."""

from __future__ import annotations

import os
from typing import Any

from imgcls_dist.errors import UserError

INSTALL_HINT = "pip install 'imgcls-dist[mlflow]'"
# MLflow's HTTP client retries 7 times with a backoff factor of 2 by default: minutes before a dead server is
# reported, during which a training callback would hold the Train controller. A user's own setting wins.
RETRY_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                  "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}
# What a process that logs on our behalf (the Train controller, a Tune trial's actor, on any node) needs of the
# driver's environment: where the server is and the user's credentials, as MLflow reads them.
ENV_PREFIXES = ("MLFLOW_",)


def mlflow_env() -> dict[str, str]:
    """The MLFLOW_* variables of this process, our retry defaults filled in: what remote loggers are given."""
    return {**RETRY_DEFAULTS, **{k: v for k, v in os.environ.items() if k.startswith(ENV_PREFIXES)}}


def apply_env(env: dict[str, str]) -> None:
    """In a remote process: the driver's MLflow settings, so that the client there reaches the same server."""
    for k, v in env.items():
        os.environ.setdefault(k, v)


def require_mlflow(what: str) -> Any:
    try:
        import mlflow
    except ImportError:
        raise UserError(f"{what} needs MLflow, which is not installed: {INSTALL_HINT}") from None
    return mlflow


def client(what: str = "run.tracking=mlflow"):
    """An MlflowClient for the tracking URI MLflow itself resolves (MLFLOW_TRACKING_URI first)."""
    require_mlflow(what)
    apply_env(RETRY_DEFAULTS)
    from mlflow.tracking import MlflowClient

    return MlflowClient()


def tracking_uri() -> str:
    import mlflow

    return mlflow.get_tracking_uri()


def first_line(e: BaseException) -> str:
    """An MLflow/requests exception in one line: MLflow's messages carry the server's JSON and a traceback-like
    tail; the first line (or the exception's type) names the failure."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text[:300]


def check_server(what: str = "run.tracking=mlflow") -> str:
    """Before any work: the tracking server answers and accepts the credentials; returns its URI. Otherwise one
    UserError line naming the URI and the reason."""
    c = client(what)
    uri = tracking_uri()
    try:
        c.search_experiments(max_results=1)
    except Exception as e:  # noqa: BLE001 - connection refused, 401/403, DNS, TLS: all say the same to the user
        raise UserError(f"{what}: the MLflow tracking server at {uri} cannot be used ({first_line(e)}); set "
                        "MLFLOW_TRACKING_URI (and MLFLOW_TRACKING_TOKEN or _USERNAME/_PASSWORD) to a server that "
                        "answers") from None
    return uri
