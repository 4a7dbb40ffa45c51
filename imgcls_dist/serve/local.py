"""`imgcls-dist serve`: the application on a local Ray (or RAY_ADDRESS), in the foreground until Ctrl-C."""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

from imgcls_dist.serve.deployment import build_app, replica_options, replica_settings
from imgcls_dist.serve.settings import ServeLimits, ServeSettings

APP_NAME = "imgcls"
# Serve's INFO lines (one per request, replica start-up chatter) would drown the URL line; warnings stay.
SERVE_LOGGING = {"log_level": "WARNING", "enable_access_log": False}


def start_app(settings: ServeSettings, *, host: str = "127.0.0.1", port: int = 8000,
              limits: ServeLimits | None = None, **options: Any) -> str:
    """Start Serve's proxy on host:port and deploy the app; returns its base URL once replicas are ready.
    `limits` (default ServeLimits()) are the request timeout and queue bounds; `options` go to `replica_options`
    (replicas, cpus, gpus). The timeout is the proxy's: a Serve already running here keeps its own."""
    from ray import serve

    from imgcls_dist.ray_utils import ensure_ray

    limits = limits or ServeLimits()
    ensure_ray()
    serve.start(http_options={"host": host, "port": port, **limits.http_options()}, logging_config=SERVE_LOGGING)
    serve.run(build_app(settings, limits, **replica_options(**options)), name=APP_NAME, route_prefix="/",
              logging_config=SERVE_LOGGING)
    return f"http://{host}:{port}"


def serve_forever(settings: ServeSettings, *, host: str, port: int, limits: ServeLimits | None = None,
                  **options: Any) -> None:
    """Serve until SIGINT/SIGTERM, then shut Serve down (its controller, proxies and replicas). The replicas run
    the precision and backend resolved here for their device, the ones the first line names, with its limits."""
    from ray import serve

    from imgcls_dist.ray_utils import ensure_ray

    # Serve's driver-side INFO ("Started Serve", "Application ... is ready") repeats what the line below says.
    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    ensure_ray()  # replica_options looks for GPUs in the cluster
    settings, chosen, runtime = replica_settings(settings, replica_options(**options))
    limits = limits or ServeLimits()
    url = start_app(settings, host=host, port=port, limits=limits, **options)
    print(f"serving {', '.join(settings.models)} at {url}/predict, {chosen}, {runtime}, timeout "
          f"{limits.request_timeout_s:g} s, queue {limits.max_queued_requests}  (GET {url}/info; Ctrl-C stops)",
          flush=True)
    try:
        stop.wait()
    finally:
        print("serve: shutting down", flush=True)
        serve.shutdown()
