"""The Ray Serve application: the batch job's `EnsemblePredictor`, decode and resize behind HTTP.

One code path with `infer`/`predict`: the replica builds its predictor with `load_predictor` (ensemble.json
weights, temperatures and views; `--tta` overrides) and turns request bytes into model inputs with
`prepare_encoded`, the function the Ray Data decode stage calls (a GPU replica decodes JPEGs on its device,
as `infer --decode device` does), so a bad image is one row's error string here as there. Concurrent
requests meet in `@serve.batch`: each image of each request is one batch item, so a batch's forward is
shared, and an image that fails to decode only fails its own request (HTTP 400).

Routes: POST /predict (raw image body or multipart `file` fields; ?topk=N), GET /info, GET /stats (this
replica's request and batch-size counters); with a token (ServeSettings.auth_token) each of them answers 401
without `Authorization: Bearer <token>`. Serve's proxy answers /-/healthz and /-/routes (no token: they say
nothing about the models).
"""

# No `from __future__ import annotations` here: FastAPI reads the route signatures (Request, Query) at runtime.
import asyncio
import hashlib
import json
from collections import Counter
from typing import Any

import numpy as np
import ray
from fastapi import FastAPI, Query, Request
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve import Application

from imgcls_dist.predictor.device_decode import prepare_on_device
from imgcls_dist.predictor.decode_mode import resolve_decode
from imgcls_dist.predictor.backend import BackendChoice, check_calibration, choose_runtime
from imgcls_dist.predictor.precision import PrecisionChoice
from imgcls_dist.predictor.predict import load_predictor, top_classes
from imgcls_dist.predictor.prepare import prepare_encoded
from imgcls_dist.predictor.scores import entropy_nats
from imgcls_dist.serve.settings import (DEFAULT_BATCH_WAIT_S, DEFAULT_MAX_BATCH_SIZE, ServeSettings, authorized,
                                        with_env_token)
from imgcls_dist.serve.uploads import RequestError, Upload, is_multipart, read_uploads

DEPLOYMENT = "Classifier"
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


@serve.deployment(name=DEPLOYMENT, ray_actor_options={"num_cpus": 1}, max_ongoing_requests=64)
@serve.ingress(api)
class Classifier:
    def __init__(self, settings: dict[str, Any]):
        self.settings = ServeSettings(**settings)
        s = self.settings
        # Torch's intra-op pool as wide as the CPUs Serve reserved (as the batch job's PredictActor does): left
        # to torch, a 1-CPU replica's forward ran slower, contending with the proxy's threads
        # (docs/benchmarks.md, "Serve").
        # (torch imported here: Serve pickles the ingress app by value, and torch's module globals do not pickle.)
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
        self.requests = Counter()

    # The settings' values replace these in __init__.
    @serve.batch(max_batch_size=DEFAULT_MAX_BATCH_SIZE, batch_wait_timeout_s=DEFAULT_BATCH_WAIT_S)
    async def classify(self, images: list[bytes]) -> list[tuple[np.ndarray | None, str | None]]:
        self.batch_sizes[len(images)] += 1
        # On this (user-code) event loop, not in a thread: Serve receives requests and answers health checks on
        # the replica's own loop meanwhile, and requests that arrive during a forward join the next batch.
        # asyncio.to_thread served fewer requests/s at concurrency 16: the forward thread contended for the GIL
        # with the loop's request handling (docs/benchmarks.md, "Serve").
        return classify_encoded(self.predictor, self.decode, images)

    def _refused(self, request: Request) -> JSONResponse | None:
        """401 unless the request carries the token (when there is one)."""
        if authorized(request.headers.get("authorization"), self.settings.auth_token):
            return None
        self.requests["http_401"] += 1
        return JSONResponse({"error": "missing or wrong bearer token (Authorization: Bearer <token>)"},
                            status_code=401, headers={"WWW-Authenticate": "Bearer"})

    def _answer(self, uploads: list[Upload], outcomes, topk: int, multipart: bool) -> JSONResponse:
        results, first_error = [], None
        for i, (up, (probs, error)) in enumerate(zip(uploads, outcomes)):
            r = {"error": error} if error is not None else image_result(probs, self.predictor.classes, topk)
            r["ensemble_id"] = self.id
            results.append({"filename": up.name, **r} if multipart else r)
            if error is not None and first_error is None:
                first_error = f"file {i + 1} ({up.name or 'unnamed'}): {error}"
        status = 200 if first_error is None else 400
        if not multipart:
            return JSONResponse(results[0], status_code=status)
        body = {"results": results, "ensemble_id": self.id, **({"error": first_error} if first_error else {})}
        return JSONResponse(body, status_code=status)

    @api.post("/predict")
    async def predict(self, request: Request, topk: int | None = Query(None, ge=1)) -> JSONResponse:
        s = self.settings
        self.requests["requests"] += 1
        if (refused := self._refused(request)) is not None:
            return refused
        try:
            uploads = await read_uploads(request, s.max_body_bytes, s.max_files)
        except RequestError as exc:
            self.requests[f"http_{exc.status}"] += 1
            return JSONResponse({"error": exc.message}, status_code=exc.status)
        outcomes = await asyncio.gather(*(self.classify(u.data) for u in uploads))
        self.requests["images"] += len(uploads)
        response = self._answer(uploads, outcomes, topk or s.topk, is_multipart(request))
        self.requests[f"http_{response.status_code}"] += 1
        return response

    @api.get("/info", response_model=None)
    async def info(self, request: Request) -> dict[str, Any] | JSONResponse:
        if (refused := self._refused(request)) is not None:
            return refused
        p, s = self.predictor, self.settings
        return {"ensemble_id": self.id, "members": p.describe(), "classes": p.classes, "views": p.views,
                "combine": p.combine, "input_sizes": [{"image_size": k[0], "channels": k[1]} for k in p.input_keys],
                "device": str(p.device), "precision": p.precision, "precision_reason": p.precision_choice.reason,
                "backend": p.backend, "backend_reason": p.backend_choice.reason,
                "torch_threads": self.torch_threads, "max_batch_size": s.max_batch_size,
                "batch_wait_timeout_s": s.batch_wait_timeout_s, "max_body_bytes": s.max_body_bytes,
                "auth": s.auth_token is not None}

    @api.get("/stats", response_model=None)
    async def stats(self, request: Request) -> dict[str, Any] | JSONResponse:
        """This replica's counters (a request lands on one replica; sum over replicas for the app)."""
        if (refused := self._refused(request)) is not None:
            return refused
        sizes = self.batch_sizes
        return {**self.requests, "batches": sum(sizes.values()), "max_batch_size_seen": max(sizes, default=0),
                "batch_sizes": {str(k): v for k, v in sorted(sizes.items())}}


def build_app(settings: ServeSettings, **deployment_options: Any) -> Application:
    """The application for `serve.run`; `deployment_options` are Serve's (num_replicas, ray_actor_options, ...)."""
    deployment = Classifier.options(**deployment_options) if deployment_options else Classifier
    return deployment.bind(settings.model_dump())


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
