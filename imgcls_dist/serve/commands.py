"""CLI subcommand `serve`: parses arguments and calls `serve.local.serve_forever`."""

from __future__ import annotations

import argparse


def _validated(model, given: dict):
    """`model(**given)` with the values given (None: the model's default), its first error as one UserError line."""
    from pydantic import ValidationError

    from imgcls_dist.errors import UserError

    try:
        return model(**{k: v for k, v in given.items() if v is not None})
    except ValidationError as exc:
        err = exc.errors()[0]
        raise UserError(f"serve: {'.'.join(str(x) for x in err['loc'])}: {err['msg']}") from None


def cmd_serve(a: argparse.Namespace) -> int:
    from imgcls_dist.errors import UserError
    from imgcls_dist.predictor.manifest import registered_as_paths
    from imgcls_dist.serve.local import serve_forever
    from imgcls_dist.serve.settings import TOKEN_ENV, ServeLimits, ServeSettings, is_loopback, with_env_token

    given = {"models": a.models, "tta": a.tta, "weights": a.weights, "combine": a.combine,
             "precision": a.precision, "backend": a.backend, "calibration": a.calibration,
             "max_batch_size": a.max_batch_size,
             "batch_wait_timeout_s": None if a.batch_wait_ms is None else a.batch_wait_ms / 1000.0,
             "max_body_bytes": None if a.max_body_mb is None else int(a.max_body_mb * 1024 * 1024),
             "auth_token": a.auth_token}
    settings = with_env_token(_validated(ServeSettings, given))
    limits = _validated(ServeLimits, {"request_timeout_s": a.request_timeout_s,
                                      "max_ongoing_requests": a.max_ongoing_requests,
                                      "max_queued_requests": a.max_queued_requests, "retry_after_s": a.retry_after_s})
    if not is_loopback(a.host) and settings.auth_token is None and not a.insecure:
        raise UserError(f"serve: --host {a.host} accepts connections from other machines: give a token "
                        f"(${TOKEN_ENV} or --auth-token) or say --insecure to serve without one")
    # Registered models (`models:/...`) resolved here, once, to their files: every replica then serves the same
    # version (an alias may move while replicas start), and replicas need no MLflow settings.
    settings = settings.model_copy(update={"models": registered_as_paths(settings.models)})
    serve_forever(settings, host=a.host, port=a.port, limits=limits, replicas=a.replicas, cpus=a.cpus_per_replica,
                  gpus=a.gpus_per_replica)
    return 0


def register_serve_command(sub) -> None:
    from imgcls_dist.predictor.commands import add_model_args
    from imgcls_dist.serve.settings import ServeLimits, ServeSettings

    default = {k: f.default for k, f in ServeSettings.model_fields.items()}
    limit = {k: f.default for k, f in ServeLimits.model_fields.items()}
    p = sub.add_parser("serve", help="HTTP inference API with Ray Serve (same ensemble + TTA as infer)")
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default loopback only)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    p.add_argument("--auth-token", default=None,
                   help="requests need 'Authorization: Bearer TOKEN' (prefer $IMGCLS_DIST_SERVE_TOKEN: a flag shows "
                        "in the process list)")
    p.add_argument("--insecure", action="store_true",
                   help="allow a non-loopback --host without a token")
    p.add_argument("--replicas", type=int, default=None, help="replicas (default 1)")
    p.add_argument("--cpus-per-replica", type=float, default=1.0, help="CPUs each replica reserves (default 1)")
    p.add_argument("--gpus-per-replica", type=float, default=None, help="default: 1 when the cluster has GPUs")
    p.add_argument("--max-batch-size", type=int, default=None,
                   help=f"images per batched forward (default {default['max_batch_size']})")
    p.add_argument("--batch-wait-ms", type=float, default=None,
                   help=f"how long a batch waits to fill (default {default['batch_wait_timeout_s'] * 1000:g})")
    p.add_argument("--max-body-mb", type=float, default=None,
                   help=f"larger request bodies get HTTP 413 (default {default['max_body_bytes'] / 2**20:g})")
    p.add_argument("--request-timeout-s", type=float, default=None,
                   help=f"a request still unanswered after this long, queueing included, gets HTTP 408 "
                        f"(default {limit['request_timeout_s']:g})")
    p.add_argument("--max-ongoing-requests", type=int, default=None,
                   help=f"requests one replica works on at once (default {limit['max_ongoing_requests']})")
    p.add_argument("--max-queued-requests", type=int, default=None,
                   help=f"requests queued for the replicas once they are all busy; more get HTTP 503 with "
                        f"Retry-After (default {limit['max_queued_requests']})")
    p.add_argument("--retry-after-s", type=float, default=None,
                   help=f"Retry-After of those 503s and of a replica lost mid-request "
                        f"(default {limit['retry_after_s']:g})")
    p.set_defaults(func=cmd_serve)
