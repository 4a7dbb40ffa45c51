"""`imgcls-dist serve`: the application on a local Ray (or RAY_ADDRESS), in the foreground until Ctrl-C."""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

from imgcls_dist.serve.deployment import build_app, replica_options, replica_settings
from imgcls_dist.serve.settings import ServeSettings

APP_NAME = "imgcls"
# Serve's INFO lines (one per request, replica start-up chatter) would drown the URL line; warnings stay.
SERVE_LOGGING = {"log_level": "WARNING", "enable_access_log": False}


def start_app(settings: ServeSettings, *, host: str = "127.0.0.1", port: int = 8000,
              **options: Any) -> str:
    """Start Serve's proxy on host:port and deploy the app; returns its base URL once replicas are ready.
    `options` go to `replica_options` (replicas, cpus, gpus)."""
    from ray import serve

    from imgcls_dist.ray_utils import ensure_ray

    ensure_ray()
    serve.start(http_options={"host": host, "port": port}, logging_config=SERVE_LOGGING)
    serve.run(build_app(settings, **replica_options(**options)), name=APP_NAME, route_prefix="/",
              logging_config=SERVE_LOGGING)
    return f"http://{host}:{port}"


def serve_forever(settings: ServeSettings, *, host: str, port: int, **options: Any) -> None:
    """Serve until SIGINT/SIGTERM, then shut Serve down (its controller, proxies and replicas). The replicas run
    the precision and backend resolved here for their device, the ones the first line names."""
    from ray import serve

    from imgcls_dist.ray_utils import ensure_ray

    # Serve's driver-side INFO ("Started Serve", "Application ... is ready") repeats what the line below says.
    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    ensure_ray()  # replica_options looks for GPUs in the cluster
    settings, chosen, runtime = replica_settings(settings, replica_options(**options))
    url = start_app(settings, host=host, port=port, **options)
    print(f"serving {', '.join(settings.models)} at {url}/predict, {chosen}, {runtime}  (GET {url}/info; Ctrl-C stops)",
          flush=True)
    try:
        stop.wait()
    finally:
        print("serve: shutting down", flush=True)
        serve.shutdown()
