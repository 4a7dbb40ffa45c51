"""The Ray Serve application: the batch job's `EnsemblePredictor`, decode and resize behind HTTP.

One code path with `infer`/`predict`: the replica builds its predictor with `load_predictor` (ensemble.json
weights, temperatures and views; `--tta` overrides) and turns request bytes into model inputs with
`prepare_encoded`, the function the Ray Data decode stage calls (a GPU replica decodes JPEGs on its device,
as `infer --decode device` does), so a bad image is one row's error string here as there. Concurrent
requests meet in `@serve.batch`: each image of each request is one batch item, so a batch's forward is
shared, and an image that fails to decode only fails its own request (HTTP 400).

Two deployments: `Ingress` (FastAPI: token, body limits, the answers) in front of `Classifier` (the model
replicas), so that a model replica lost mid-request is answered 503 with Retry-After rather than Serve's bare
500 (Ingress's docstring). The request timeout and the queue bounds are Serve's (ServeLimits). The reasoning:
docs/design.md, "Serving".

Routes: POST /predict (raw image body or multipart `file` fields; ?topk=N), GET /info, GET /stats (request
counters of the Ingress replica, image and batch-size counters of a Classifier replica); with a token
(ServeSettings.auth_token) each of them answers 401 without `Authorization: Bearer <token>`. Serve's proxy
answers /-/healthz and /-/routes (no token: they say nothing about the models).
"""

# No `from __future__ import annotations` here: FastAPI reads the route signatures (Request, Query) at runtime.
import asyncio
import hashlib
import json
import math
from collections import Counter
from typing import Any

import numpy as np
import ray
from fastapi import FastAPI, Query, Request
from fastapi.responses import JSONResponse
from ray import serve
from ray.exceptions import RayActorError
from ray.serve import Application
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle

from imgcls_dist.predictor.device_decode import prepare_on_device
from imgcls_dist.predictor.decode_mode import resolve_decode
from imgcls_dist.predictor.backend import BackendChoice, check_calibration, choose_runtime
from imgcls_dist.predictor.precision import PrecisionChoice
from imgcls_dist.predictor.predict import load_predictor, top_classes
from imgcls_dist.predictor.prepare import prepare_encoded
from imgcls_dist.predictor.scores import entropy_nats
from imgcls_dist.serve.settings import (DEFAULT_BATCH_WAIT_S, DEFAULT_MAX_BATCH_SIZE, ServeLimits, ServeSettings,
                                        authorized, with_env_token)
from imgcls_dist.serve.uploads import RequestError, Upload, is_multipart, read_uploads

DEPLOYMENT = "Classifier"
INGRESS = "Ingress"
# Requests one Ingress replica holds at once, and those the proxy queues for it. Each only awaits the Classifier,
# whose bounds (ServeLimits) are the ones meant to refuse work; these are high enough not to refuse first (the
# Classifier's defaults admit 64 ongoing requests a replica plus 128 queued at each Ingress replica), and keep
# the proxy's queue bounded too. Not the Classifier's bound itself: Serve counts a request as queued until its
# replica is chosen, so a burst of simultaneous arrivals would pass a small bound here only at random.
INGRESS_MAX_ONGOING = 1024
INGRESS_MAX_QUEUED = 1024
api = FastAPI(title="imgcls-dist", description="image classification with an ensemble + TTA")


def ensemble_id(members: list[dict[str, Any]], views: list[str], combine: str) -> str:
    """A short stable id of what answers: member files, weights, temperatures, views, combine rule."""
    key = [[m["path"], m["weight"], m["temperature"]] for m in members] + [views, combine]
    return hashlib.sha256(json.dumps(key).encode()).hexdigest()[:12]


def image_result(probs: np.ndarray, classes: list[str], topk: int) -> dict[str, Any]:
    top = top_classes(probs, classes, min(topk, len(classes)))
    return {"pred": top[0]["index"], "pred_name": top[0]["class"], "confidence": top[0]["prob"],
            "entropy": float(entropy_nats(probs)), "topk": top}


def classify_encoded(predictor, decode: str, images: list[bytes]) -> list[tuple[np.ndarray | None, str | None]]:
    """Each request image -> (probabilities, None) or (None, its decode error): a replica's batch. `decode`
    "device" decodes JPEGs on the predictor's device (predictor/device_decode.py), "cpu" with PIL."""
    keys = predictor.input_keys
    if decode == "device":
        inputs, errors = prepare_on_device(images, keys, predictor.device)
    else:
        inputs, errors = prepare_encoded(images, keys)
    probs = predictor.predict_uint8(inputs)
    return [(None, e) if e is not None else (p, None) for p, e in zip(probs, errors)]


@serve.deployment(name=DEPLOYMENT, ray_actor_options={"num_cpus": 1}, **ServeLimits().deployment_options())
class Classifier:
    """The model replicas: a request's images in, one result per image out (`predict`), batched across
    concurrent requests. The Ingress in front of them speaks HTTP."""

    def __init__(self, settings: dict[str, Any]):
        self.settings = ServeSettings(**settings)
        s = self.settings
        # Torch's intra-op pool as wide as the CPUs Serve reserved (as the batch job's PredictActor does): left
        # to torch, a 1-CPU replica's forward ran slower, contending with the proxy's threads
        # (docs/benchmarks.md, "Serve").
        # (torch imported here: Serve pickles the deployment class by value, and torch's module globals do not
        # pickle.)
        import torch

        torch.set_num_threads(max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1))))
        self.torch_threads = torch.get_num_threads()
        self.predictor = load_predictor(s.models, tta=s.tta, weights=s.weights, combine=s.combine,
                                        device=s.device, batch_size=s.max_batch_size, precision=s.precision,
                                        backend=s.backend, calibration=s.calibration)
        self.id = ensemble_id(self.predictor.describe(), self.predictor.views, self.predictor.combine)
        # The batch job's rule: JPEGs decoded by nvJPEG on a GPU replica, by PIL on CPU ones.
        self.decode = resolve_decode(s.decode, 1.0 if self.predictor.device.type == "cuda" else 0.0)
        self.classify.set_max_batch_size(s.max_batch_size)
        self.classify.set_batch_wait_timeout_s(s.batch_wait_timeout_s)
        self.batch_sizes: Counter[int] = Counter()
        self.images = 0

    # The settings' values replace these in __init__.
    @serve.batch(max_batch_size=DEFAULT_MAX_BATCH_SIZE, batch_wait_timeout_s=DEFAULT_BATCH_WAIT_S)
    async def classify(self, images: list[bytes]) -> list[tuple[np.ndarray | None, str | None]]:
        self.batch_sizes[len(images)] += 1
        # On this (user-code) event loop, not in a thread: Serve receives requests and answers health checks on
        # the replica's own loop meanwhile, and requests that arrive during a forward join the next batch.
        # asyncio.to_thread served fewer requests/s at concurrency 16: the forward thread contended for the GIL
        # with the loop's request handling (docs/benchmarks.md, "Serve").
        return classify_encoded(self.predictor, self.decode, images)

    async def predict(self, images: list[bytes], topk: int) -> list[dict[str, Any]]:
        """One request's images -> one result each: the prediction, or {"error": the decoder's reason}. Each
        image is one `classify` batch item, so the images of concurrent requests share forwards."""
        outcomes = await asyncio.gather(*(self.classify(data) for data in images))
        self.images += len(images)
        return [{"error": error, "ensemble_id": self.id} if error is not None
                else {**image_result(probs, self.predictor.classes, topk), "ensemble_id": self.id}
                for probs, error in outcomes]

    async def info(self) -> dict[str, Any]:
        p, s = self.predictor, self.settings
        return {"ensemble_id": self.id, "members": p.describe(), "classes": p.classes, "views": p.views,
                "combine": p.combine, "input_sizes": [{"image_size": k[0], "channels": k[1]} for k in p.input_keys],
                "device": str(p.device), "precision": p.precision, "precision_reason": p.precision_choice.reason,
                "backend": p.backend, "backend_reason": p.backend_choice.reason,
                "torch_threads": self.torch_threads, "max_batch_size": s.max_batch_size,
                "batch_wait_timeout_s": s.batch_wait_timeout_s}

    async def stats(self) -> dict[str, Any]:
        sizes = self.batch_sizes
        return {"images": self.images, "batches": sum(sizes.values()), "max_batch_size_seen": max(sizes, default=0),
                "batch_sizes": {str(k): v for k, v in sorted(sizes.items())}}


def retry_later(message: str, retry_after_s: float | None, status: int = 503) -> JSONResponse:
    """A refusal the client can retry: 503 (or the backpressure config's 429) with Retry-After in whole seconds,
    rounded up as Serve's proxy rounds its own."""
    headers = {} if retry_after_s is None else {"Retry-After": str(max(0, math.ceil(retry_after_s)))}
    return JSONResponse({"error": message}, status_code=status, headers=headers)


@serve.deployment(name=INGRESS, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=INGRESS_MAX_ONGOING,
                  max_queued_requests=INGRESS_MAX_QUEUED, backpressure_config=ServeLimits().backpressure_config())
@serve.ingress(api)
class Ingress:
    """The HTTP front: token, body limits, answers; the images go to the Classifier replicas through a handle.

    A separate deployment because of what Serve does when a replica dies with requests on it: the router
    retries a request only until a replica accepts it, so the requests a killed replica had accepted fail, and
    Serve's HTTP proxy answers them 500 with no hint to retry (it has no hook to change that answer). Here the
    death arrives as an exception from the handle, and the client gets 503 with Retry-After instead. The
    Classifier's full queue arrives the same way (BackPressureError: the handle to it is this deployment's, not
    the proxy's), answered as Serve's proxy answers its own: the status and Retry-After of its backpressure
    config. Holds no CPU: it only reads bodies and awaits the Classifier."""

    def __init__(self, settings: dict[str, Any], classifier: DeploymentHandle, retry_after_s: float):
        self.settings = ServeSettings(**settings)
        self.classifier = classifier
        self.retry_after_s = retry_after_s
        self.requests = Counter()

    def _refused(self, request: Request) -> JSONResponse | None:
        """401 unless the request carries the token (when there is one)."""
        if authorized(request.headers.get("authorization"), self.settings.auth_token):
            return None
        return JSONResponse({"error": "missing or wrong bearer token (Authorization: Bearer <token>)"},
                            status_code=401, headers={"WWW-Authenticate": "Bearer"})

    async def _call(self, method: str, *args: Any) -> Any:
        """`method` of a Classifier replica -> its result, or the JSONResponse a client can retry on."""
        try:
            return await getattr(self.classifier, method).remote(*args)
        except BackPressureError as exc:
            return retry_later(exc.message, exc.retry_after_s, exc.status_code)
        except RayActorError:  # the replica died (ActorDiedError) or cannot be reached (ActorUnavailableError)
            return retry_later("the model replica was lost while answering; retry", self.retry_after_s)
        except DeploymentUnavailableError as exc:  # what Serve's proxy answers 503 too
            return retry_later(exc.message, self.retry_after_s)

    async def _authorized_call(self, request: Request, method: str) -> Any:
        """A GET route's Classifier call behind the token: its result, or the 401 (counted) or retryable answer."""
        if (refused := self._refused(request)) is not None:
            self.requests["http_401"] += 1
            return refused
        return await self._call(method)

    def _answer(self, uploads: list[Upload], results: list[dict[str, Any]], multipart: bool) -> JSONResponse:
        first_error = next((f"file {i + 1} ({up.name or 'unnamed'}): {r['error']}"
                            for i, (up, r) in enumerate(zip(uploads, results)) if "error" in r), None)
        status = 200 if first_error is None else 400
        if not multipart:
            return JSONResponse(results[0], status_code=status)
        body = {"results": [{"filename": up.name, **r} for up, r in zip(uploads, results)],
                "ensemble_id": results[0]["ensemble_id"], **({"error": first_error} if first_error else {})}
        return JSONResponse(body, status_code=status)

    async def _predict(self, request: Request, topk: int | None) -> JSONResponse:
        if (refused := self._refused(request)) is not None:
            return refused
        s = self.settings
        try:
            uploads = await read_uploads(request, s.max_body_bytes, s.max_files)
        except RequestError as exc:
            return JSONResponse({"error": exc.message}, status_code=exc.status)
        results = await self._call("predict", [u.data for u in uploads], topk or s.topk)
        if isinstance(results, JSONResponse):
            return results
        return self._answer(uploads, results, is_multipart(request))

    @api.post("/predict")
    async def predict(self, request: Request, topk: int | None = Query(None, ge=1)) -> JSONResponse:
        self.requests["requests"] += 1
        response = await self._predict(request, topk)
        self.requests[f"http_{response.status_code}"] += 1
        return response

    @api.get("/info", response_model=None)
    async def info(self, request: Request) -> dict[str, Any] | JSONResponse:
        """What a Classifier replica serves, this front's body limit and whether it asks for a token."""
        info = await self._authorized_call(request, "info")
        if isinstance(info, JSONResponse):
            return info
        return {**info, "max_body_bytes": self.settings.max_body_bytes, "auth": self.settings.auth_token is not None}

    @api.get("/stats", response_model=None)
    async def stats(self, request: Request) -> dict[str, Any] | JSONResponse:
        """This Ingress replica's request counters and one Classifier replica's image and batch counters (a
        request lands on one of each; sum over replicas for the app)."""
        stats = await self._authorized_call(request, "stats")
        if isinstance(stats, JSONResponse):
            return stats
        return {**self.requests, **stats}


def build_app(settings: ServeSettings, limits: ServeLimits | None = None, **deployment_options: Any) -> Application:
    """The application for `serve.run`: the Ingress in front of the Classifier replicas. `limits` None leaves the
    deployments' defaults (ServeLimits' own, which a config file's `deployments:` may change); `deployment_options`
    are Serve's for the Classifier (num_replicas, ray_actor_options, ...). The Ingress runs as many replicas as
    the Classifier is given (one by default)."""
    given = limits or ServeLimits()
    classifier = Classifier.options(**{**(limits.deployment_options() if limits else {}), **deployment_options})
    ingress_options = {**({"backpressure_config": limits.backpressure_config()} if limits else {}),
                       **{k: v for k, v in deployment_options.items() if k == "num_replicas"}}
    ingress = Ingress.options(**ingress_options)
    payload = settings.model_dump()
    return ingress.bind(payload, classifier.bind(payload), given.retry_after_s)


def replica_options(cpus: float = 1.0, gpus: float | None = None, replicas: int | None = None) -> dict[str, Any]:
    """Serve deployment options: one GPU per replica when the cluster has GPUs (gpus None), else CPUs only."""
    import ray

    from imgcls_dist.ray_utils import cluster_gpus

    if gpus is None:
        gpus = 1.0 if ray.is_initialized() and cluster_gpus() >= 1 else 0.0
    opts: dict[str, Any] = {"ray_actor_options": {"num_cpus": cpus, "num_gpus": gpus}}
    if replicas is not None:
        opts["num_replicas"] = replicas
    return opts


def replica_settings(settings: ServeSettings,
                     options: dict[str, Any]) -> tuple[ServeSettings, PrecisionChoice, BackendChoice]:
    """`settings` with its precision and backend resolved for the replicas' device (settings.device, else a GPU
    when `options` (replica_options) gives them one), and those choices: `imgcls-dist serve` prints them and
    every replica runs them, as the batch job's actors run what its driver resolved."""
    gpus = options.get("ray_actor_options", {}).get("num_gpus") or 0
    runtime, chosen = choose_runtime(settings.backend, settings.precision,
                                     settings.device or ("cuda" if gpus > 0 else "cpu"))
    check_calibration(chosen.precision, settings.calibration)
    return settings.model_copy(update={"precision": chosen.precision, "backend": runtime.backend}), chosen, runtime


def app(args: dict[str, Any]) -> Application:
    """Application builder for `serve run imgcls_dist.serve:app models=...` and Serve config files
    (`import_path: imgcls_dist.serve:app`, `args:`). `serve run` calls it before connecting to Ray, so GPUs
    cannot be detected there: on a GPU cluster set `ray_actor_options.num_gpus` in the config file's
    `deployments:` (configs/serve.yaml shows where), or run `imgcls-dist serve`, which detects them."""
    return build_app(with_env_token(ServeSettings(**args)), **replica_options())
