"""The serving application's arguments: what `serve run imgcls_dist.serve:app k=v`, `configs/serve.yaml` (`args:`)
and `imgcls-dist serve` give. Replicas, autoscaling and actor resources are Serve's own deployment options
(`deployments:` in the config file, `--replicas` on the command line), not repeated here; so are the request
timeout and the queue bounds (ServeLimits: `http_options:` and `deployments:` in a config file)."""

from __future__ import annotations

import ipaddress
import os
import secrets

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from imgcls_dist.predictor.decode_mode import DECODE_MODES
from imgcls_dist.predictor.options import BACKENDS, HANDED_ON_PRECISIONS, PRECISIONS

# A 12 MP phone JPEG is 2-6 MB; 16 MiB leaves room for a few per multipart request and refuses
# accidental uploads of video or archives before they are read.
DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024
# At most 5 ms added to a lone request; shorter waits did no better on CPU (docs/benchmarks.md, "Serve").
DEFAULT_BATCH_WAIT_S = 0.005
DEFAULT_MAX_BATCH_SIZE = 16
# Serve's own default is no timeout at all: a stuck forward would hold its client and its replica slot for ever.
# A minute is far beyond any answer measured (p99 under 1 s at 16 clients on one CPU, docs/benchmarks.md,
# "Serve"), so only a request that is stuck, or queued behind far too much work, meets it.
DEFAULT_REQUEST_TIMEOUT_S = 60.0
# Requests one Classifier replica works on at once: 4 full batches at the default max_batch_size.
DEFAULT_MAX_ONGOING_REQUESTS = 64
# Requests each caller (an Ingress replica) holds back while every Classifier replica has its
# max_ongoing_requests: at the ~40 requests/s one CPU replica answers, a full queue drains in about 3 s, well
# inside the timeout. Beyond it a client learns at once to come back later (503, Retry-After) instead of waiting.
DEFAULT_MAX_QUEUED_REQUESTS = 128
# The Retry-After of a 503 (a full queue, a lost replica): a replica frees slots within a batch or two.
DEFAULT_RETRY_AFTER_S = 1.0
# The bearer token every request must carry when no `auth_token` is given: an environment variable keeps it out
# of config files and of the process list (`--auth-token` shows in `ps`).
TOKEN_ENV = "IMGCLS_DIST_SERVE_TOKEN"


class ServeSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    models: list[str] = Field(min_length=1, description="one ensemble.json, or model files / checkpoint dirs")
    tta: str | None = Field(None, description="views as in infer --tta; None: the manifest's, else the default")
    weights: list[float] | None = None
    combine: str | None = None
    max_batch_size: int = Field(DEFAULT_MAX_BATCH_SIZE, ge=1,
                                description="images per @serve.batch forward (before TTA views)")
    batch_wait_timeout_s: float = Field(DEFAULT_BATCH_WAIT_S, ge=0)
    max_body_bytes: int = Field(DEFAULT_MAX_BODY_BYTES, ge=1)
    max_files: int = Field(64, ge=1, description="file fields per multipart request")
    topk: int = Field(5, ge=1, description="default for ?topk=")
    device: str | None = Field(None, description="None: cuda when the replica has a GPU, else cpu")
    decode: str = Field("auto", description="as infer --decode: auto (on the device when it is a GPU), cpu, device")
    precision: str = Field("auto", description="as infer --precision: auto, fp32, bf16 (predictor/precision.py)")
    backend: str = Field("auto", description="as infer --backend: auto, torch, onnxruntime (predictor/backend.py)")
    calibration: str | None = Field(None, description="as infer --calibration: precision int8's dataset")
    auth_token: SecretStr | None = Field(None, description=f"requests need 'Authorization: Bearer <token>' "
                                                           f"(default: ${TOKEN_ENV}, else no authentication)")

    @field_validator("models", mode="before")
    @classmethod
    def _one_or_many(cls, v):
        # `serve run imgcls_dist.serve:app models=a.pt` passes one string; a comma list names several.
        return [p for p in v.split(",") if p] if isinstance(v, str) else v

    @field_validator("decode")
    @classmethod
    def _decode(cls, v):
        return _one_of(v, DECODE_MODES)

    @field_validator("precision")
    @classmethod
    def _precision(cls, v):
        if v not in HANDED_ON_PRECISIONS:  # fp16: what `imgcls-dist serve` hands on for a GPU without bf16
            raise ValueError(f"must be one of {', '.join(PRECISIONS)}")
        return v

    @field_validator("backend")
    @classmethod
    def _backend(cls, v):
        return _one_of(v, BACKENDS)

    @field_validator("weights", mode="before")
    @classmethod
    def _weights(cls, v):
        return [float(x) for x in v.split(",") if x.strip()] if isinstance(v, str) else v


class ServeLimits(BaseModel):
    """How long a request may take and how many may wait. These are Serve's own options, not the application's
    `args`: the timeout is the HTTP proxy's (`http_options.request_timeout_s`: past it the proxy answers 408 and
    cancels the request), the bounds are the Classifier deployment's (`max_ongoing_requests` per replica,
    `max_queued_requests` per caller, answered 503 with Retry-After past them). `imgcls-dist serve` takes them
    as flags; a Serve config file sets them where Serve reads them, and the deployments' decorators default to
    this model's defaults."""

    model_config = ConfigDict(extra="forbid")

    request_timeout_s: float = Field(DEFAULT_REQUEST_TIMEOUT_S, gt=0,
                                     description="end to end, queueing included; past it: HTTP 408")
    max_ongoing_requests: int = Field(DEFAULT_MAX_ONGOING_REQUESTS, ge=1,
                                      description="requests one Classifier replica works on at once")
    max_queued_requests: int = Field(DEFAULT_MAX_QUEUED_REQUESTS, ge=1,
                                     description="requests each caller queues for the replicas; past it: HTTP 503")
    retry_after_s: float = Field(DEFAULT_RETRY_AFTER_S, ge=0,
                                 description="Retry-After of a 503 (full queue, lost replica), rounded up")

    def http_options(self) -> dict[str, float]:
        return {"request_timeout_s": self.request_timeout_s}

    def backpressure_config(self) -> dict[str, object]:
        """Serve's answer to a request refused by a full queue: 503 with Retry-After."""
        return {"status_code": 503, "retry_after_s": self.retry_after_s}

    def deployment_options(self) -> dict[str, object]:
        """Serve's options for the Classifier deployment."""
        return {"max_ongoing_requests": self.max_ongoing_requests, "max_queued_requests": self.max_queued_requests,
                "backpressure_config": self.backpressure_config()}


def _one_of(value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"must be one of {', '.join(choices)}")
    return value


def with_env_token(settings: ServeSettings) -> ServeSettings:
    """`settings` with the token from $IMGCLS_DIST_SERVE_TOKEN when it names none (an empty variable is none)."""
    if settings.auth_token is None and os.environ.get(TOKEN_ENV):
        return settings.model_copy(update={"auth_token": SecretStr(os.environ[TOKEN_ENV])})
    return settings


def authorized(header: str | None, token: SecretStr | None) -> bool:
    """Whether an Authorization header value passes: always without a token, else exactly "Bearer <token>"
    (compared in constant time)."""
    if token is None:
        return True
    scheme, _, given = (header or "").partition(" ")
    return scheme.lower() == "bearer" and secrets.compare_digest(given.strip().encode(),
                                                                 token.get_secret_value().encode())


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve beyond this machine
