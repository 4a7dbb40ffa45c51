"""The Ray Serve application on the session's 2-CPU Ray, through a real HTTP client on loopback: answers equal
the in-process predictor's, multipart order, every bad input's status and reason, real batching under 32
concurrent clients, and a shutdown that leaves no Serve actor behind. Plus `imgcls-dist serve` as a process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from imgcls_dist.ports import free_port
from helpers.image_fixtures import damaged, write_image_fixtures
from helpers.model_files import train_digits_model

from imgcls_dist.data.schema import split_files
from imgcls_dist.predictor.predict import load_predictor
from imgcls_dist.predictor.prepare import prepare_encoded
from imgcls_dist.serve.settings import TOKEN_ENV, ServeSettings

ROOT = Path(__file__).resolve().parents[2]
MAX_BODY = 4 * 1024 * 1024  # above the large damaged fixtures (~0.3 MB)


def post(url: str, body: bytes, ctype: str = "image/png", timeout: float = 60,
         headers: dict | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": ctype, **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def get(url: str, timeout: float = 30, headers: dict | None = None) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=timeout) as r:
            raw = r.read()
            return r.status, json.loads(raw) if raw[:1] in (b"{", b"[") else {"text": raw.decode()}
    except urllib.error.HTTPError as e:
        return e.code, {}


def multipart(files: list[tuple[str, bytes]], field: str = "file") -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = []
    for name, data in files:
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{name}"\r\n'
                     f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def digit_pngs(digits_dir: Path, n: int) -> list[tuple[bytes, int]]:
    import pyarrow.parquet as pq

    f = split_files(digits_dir, "test")[0]
    t = pq.read_table(f.path, filesystem=f.fs, columns=["image", "label"]).slice(0, n)
    return list(zip(t.column("image").to_pylist(), t.column("label").to_pylist()))


def serve_actors() -> list[str]:
    """Serve's live actors (controller, proxies, replicas: named, in namespace "serve") on the connected cluster.
    From the GCS of this connection, not the State API, which looks for "the" local Ray instance and fails
    when the machine runs another one."""
    import ray

    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == "serve"]


@pytest.fixture(scope="module")
def model(digits_dir, tmp_path_factory):
    return train_digits_model(tmp_path_factory.mktemp("serve_model") / "m", digits_dir, epochs=6, seed=0)


SERVED_TEMPERATURE = 0.5  # != 1, so an answer at T = 1 would not match the manifest's predictor


@pytest.fixture(scope="module")
def manifest(model, tmp_path_factory):
    """An ensemble.json as `ensemble build` writes it: the model with a temperature and the manifest's views."""
    path = tmp_path_factory.mktemp("serve_manifest") / "ensemble.json"
    path.write_text(json.dumps({"models": [{"path": str(model), "weight": 1.0, "temperature": SERVED_TEMPERATURE}],
                                "combine": "weighted", "views": ["identity", "shift_left"]}))
    return path


@pytest.fixture(scope="module")
def server(ray_session, manifest):
    from ray import serve

    from imgcls_dist.serve.local import start_app

    settings = ServeSettings(models=[str(manifest)], max_batch_size=8, batch_wait_timeout_s=0.02,
                             max_body_bytes=MAX_BODY)
    url = start_app(settings, port=free_port(), cpus=1)
    yield url
    serve.shutdown()


def test_a_replica_decoding_on_its_device_answers_as_the_cpu_decode_and_keeps_error_strings(model, tmp_path):
    """A replica's batch with `decode: device` (auto on a GPU replica), torchvision's CPU decoder in nvJPEG's
    place. Damaged files keep the CPU path's errors and PNGs (CPU path in both) get the same probabilities;
    digit photos (JPEG, decoded whole instead of at a reduced scale) get the same class."""
    from imgcls_dist.data.builtin import digits_images
    from imgcls_dist.data.synthetic import photo_jpeg
    from imgcls_dist.serve.deployment import classify_encoded

    predictor = load_predictor([str(model)], tta="identity", device="cpu")
    fixtures = write_image_fixtures(tmp_path)
    images = [f.path.read_bytes() for f in fixtures]
    cpu, dev = (classify_encoded(predictor, mode, images) for mode in ("cpu", "device"))
    for f, (p_cpu, e_cpu), (p_dev, e_dev) in zip(fixtures, cpu, dev):
        assert e_dev == e_cpu, f.name
        if e_cpu is None and f.path.suffix == ".png":
            assert abs(p_dev - p_cpu).max() < 1e-6, f.name
    assert sum(e is not None for _, e in dev) == len(damaged(fixtures)) >= 8
    digits, labels, _ = digits_images(32)
    photos = [photo_jpeg(digits[i], 640, 480, seed=i) for i in range(12)]
    cpu, dev = (classify_encoded(predictor, mode, photos) for mode in ("cpu", "device"))
    assert [p.argmax() for p, _ in dev] == [p.argmax() for p, _ in cpu]
    assert sum(p.argmax() == y for (p, _), y in zip(dev, labels)) >= 10  # the photos are the model's digits
    with pytest.raises(ValueError, match="decode"):
        ServeSettings(models=[str(model)], decode="gpu")


def test_a_digit_comes_back_with_its_class_and_the_manifests_in_process_answer(server, manifest, model, digits_dir):
    predictor = load_predictor(str(manifest))  # its temperature, weight and views
    assert predictor.temperatures == [SERVED_TEMPERATURE] and predictor.views == ["identity", "shift_left"]
    images = digit_pngs(digits_dir, 20)
    arrays, errors = prepare_encoded([b for b, _ in images], predictor.input_keys)
    expected = predictor.predict_uint8(arrays)
    unscaled = load_predictor([model], tta="identity,shift_left").predict_uint8(arrays)
    assert abs(unscaled.max(axis=1) - expected.max(axis=1)).max() > 1e-3  # the temperature shows in confidence
    correct = 0
    for (data, label), probs in zip(images, expected):
        status, r = post(f"{server}/predict?topk=3", data)
        assert status == 200, r
        assert r["pred"] == int(probs.argmax()) and r["pred_name"] == predictor.classes[r["pred"]]
        assert r["confidence"] == pytest.approx(float(probs.max()), abs=1e-5)
        assert len(r["topk"]) == 3 and r["topk"][0]["index"] == r["pred"]
        assert r["entropy"] >= 0 and isinstance(r["ensemble_id"], str) and len(r["ensemble_id"]) == 12
        correct += r["pred"] == label
    assert correct >= 17, f"{correct}/20 digits right"  # a lenet5 trained 6 epochs gets ~95%


def test_multipart_files_come_back_in_order(server, digits_dir):
    images = digit_pngs(digits_dir, 3)
    body, ctype = multipart([(f"d{i}.png", b) for i, (b, _) in enumerate(images)])
    status, r = post(f"{server}/predict", body, ctype)
    assert status == 200, r
    assert [x["filename"] for x in r["results"]] == ["d0.png", "d1.png", "d2.png"]
    singles = [post(f"{server}/predict", b)[1]["pred"] for b, _ in images]
    assert [x["pred"] for x in r["results"]] == singles


def test_info_and_health(server, model):
    status, info = get(f"{server}/info")
    assert status == 200
    assert info["classes"] == [str(i) for i in range(10)] and info["views"] == ["identity", "shift_left"]
    assert info["members"][0]["path"] == str(model) and info["input_sizes"] == [{"image_size": 16, "channels": 3}]
    assert info["members"][0]["temperature"] == SERVED_TEMPERATURE
    assert info["torch_threads"] == 1  # the server fixture's replica reserves 1 CPU
    assert get(f"{server}/-/healthz")[0] == 200


def test_each_damaged_image_is_a_400_with_the_decoders_reason(server, tmp_path):
    fixtures = damaged(write_image_fixtures(tmp_path))
    assert len(fixtures) >= 8
    for fx in fixtures:
        status, r = post(f"{server}/predict", fx.path.read_bytes(), "image/jpeg")
        assert status == 400 and fx.error_contains in r["error"], (fx.name, status, r)


def test_bad_requests_get_their_status_and_do_not_fail_their_batch_neighbours(server, digits_dir):
    png = digit_pngs(digits_dir, 1)[0][0]
    assert post(f"{server}/predict", b"x" * (MAX_BODY + 1))[0] == 413
    status, r = post(f"{server}/predict", b'{"a": 1}', "application/json")
    assert status == 415 and "not an image" in r["error"]
    body, ctype = multipart([("a.png", png)], field="other")
    assert post(f"{server}/predict", body, ctype) == (400, {"error": "multipart body has no 'file' field"})
    body, ctype = multipart([("a.png", png), ("b.bin", b"garbage"), ("c.png", png)])
    status, r = post(f"{server}/predict", body, ctype)
    assert status == 400 and r["error"].startswith("file 2 (b.bin): not an image")
    assert "pred" in r["results"][0] and "pred" in r["results"][2] and "error" in r["results"][1]
    assert get(f"{server}/nope")[0] == 404 and get(f"{server}/predict")[0] == 405
    # good and bad requests sent together share batches; only the bad ones fail
    with ThreadPoolExecutor(16) as pool:
        codes = list(pool.map(lambda i: post(f"{server}/predict", png if i % 2 else b"bad")[0], range(32)))
    assert codes == [400 if i % 2 == 0 else 200 for i in range(32)]


def chunked_post(url: str, chunks: list[bytes]) -> int:
    import http.client
    from urllib.parse import urlparse

    u = urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    conn.request("POST", u.path, body=iter(chunks), headers={"Content-Type": "image/png"}, encode_chunked=True)
    status = conn.getresponse().status
    conn.close()
    return status


def test_a_body_far_over_the_limit_gets_its_413_not_a_reset(server):
    # the server refuses from Content-Length at once; the client is still sending, so unless the server reads
    # (and drops) the rest, the client sees a connection reset instead of the answer
    for size in (MAX_BODY + 1, 3 * MAX_BODY):
        status, r = post(f"{server}/predict", b"x" * size)
        assert status == 413 and "over the limit" in r["error"], (size, status, r)


def test_a_chunked_body_over_the_limit_is_413(server):
    assert chunked_post(f"{server}/predict", [b"x" * (1 << 20)] * 5) == 413  # no Content-Length to refuse early


def test_concurrent_clients_all_succeed_and_share_batches(server, digits_dir):
    png = digit_pngs(digits_dir, 1)[0][0]
    before = get(f"{server}/stats")[1]

    def client(_):
        return [post(f"{server}/predict", png)[0] for _ in range(10)]

    with ThreadPoolExecutor(32) as pool:
        codes = [c for cs in pool.map(client, range(32)) for c in cs]
    assert codes == [200] * 320
    stats = get(f"{server}/stats")[1]
    images = stats["images"] - before["images"]
    batches = stats["batches"] - before["batches"]
    assert images == 320 and batches < images, stats  # mean batch size > 1
    assert stats["max_batch_size_seen"] > 1 and stats["max_batch_size_seen"] <= 8


def test_bench_load_generator_counts_every_request_and_its_failures(server, digits_dir):
    from benchmarks.serve_bench import load

    body = digit_pngs(digits_dir, 1)[0][0]
    ok = load(server, body, concurrency=4, requests=12, time_limit_s=60)
    assert (ok["requests"], ok["failed"]) == (12, 0)
    assert 0 < ok["p50_ms"] <= ok["p90_ms"] <= ok["p99_ms"] and ok["req_per_s"] > 0
    bad = load(server, b"not an image", concurrency=2, requests=5, time_limit_s=60)
    assert (bad["requests"], bad["failed"], bad["failures"], bad["p50_ms"]) == (5, 5, ["HTTP 400"], None)


def test_shutdown_leaves_no_serve_actors(server, digits_dir):  # last: it stops the module's server
    from ray import serve

    assert serve_actors(), "no Serve actors while serving?"
    serve.shutdown()
    deadline = time.monotonic() + 30
    while serve_actors() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert serve_actors() == []


def test_cli_serves_until_ctrl_c_and_leaves_no_serve_actors(ray_session, model, digits_dir):
    """`imgcls-dist serve` as a user runs it, joined to the session's Ray (RAY_ADDRESS) to skip a second
    Ray start-up; after the module's server is gone (the test above), so Serve starts fresh. With the
    onnxruntime backend (the module's server runs torch): the answer is the in-process ONNX Runtime predictor's.
    With a token from the environment: 401 without it, on every route of ours. The limit flags reach the server
    (its first line names them; what they do: test_serve_resilience.py)."""
    import threading

    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address, TOKEN_ENV: "t0ken"}
    auth = {"Authorization": "Bearer t0ken"}
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "imgcls_dist.cli", "serve", "--models", str(model),
                             "--port", str(port), "--tta", "none", "--backend", "onnxruntime",
                             "--request-timeout-s", "30", "--max-queued-requests", "5"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 120
        while not any("serving" in ln for ln in lines) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        url = f"http://127.0.0.1:{port}"
        assert any(f"{url}/predict" in ln and "backend onnxruntime (given)" in ln and "timeout 30 s, queue 5" in ln
                   for ln in lines), "".join(lines)
        image = digit_pngs(digits_dir, 1)[0][0]
        assert post(f"{url}/predict", image)[0] == 401
        assert post(f"{url}/predict", image, headers={"Authorization": "Bearer wrong"})[0] == 401
        assert get(f"{url}/info")[0] == 401 and get(f"{url}/stats")[0] == 401
        status, r = post(f"{url}/predict", image, headers=auth)
        predictor = load_predictor([model], tta="none", backend="onnxruntime")
        want = predictor.predict_uint8(prepare_encoded([image], predictor.input_keys)[0])[0]
        assert status == 200 and r["pred"] == int(want.argmax())
        assert r["confidence"] == pytest.approx(float(want.max()), abs=1e-5)
        info = get(f"{url}/info", headers=auth)[1]
        assert info["backend"] == "onnxruntime" and info["auth"] is True
        assert get(f"{url}/stats", headers=auth)[1]["http_401"] == 4
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0, "".join(lines)
    finally:
        if proc.poll() is None:
            proc.kill()
    reader.join(timeout=5)
    assert not any("Traceback" in ln for ln in lines), "".join(lines)
    deadline = time.monotonic() + 30
    while serve_actors() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert serve_actors() == []


def _rayservice() -> dict:
    import yaml

    return yaml.safe_load((ROOT / "cluster/kuberay/rayservice.yaml").read_text())


@pytest.mark.parametrize("name", ["configs/serve.yaml", "rayservice serveConfigV2"])
def test_shipped_serve_configs_are_valid_serve_configs_for_this_app(name):
    import ray
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from imgcls_dist.serve.deployment import DEPLOYMENT, INGRESS

    service = _rayservice()
    assert (service["apiVersion"], service["kind"]) == ("ray.io/v1", "RayService")
    raw = yaml.safe_load((ROOT / "configs/serve.yaml").read_text() if name.startswith("configs")
                         else service["spec"]["serveConfigV2"])
    (application,) = ServeDeploySchema.model_validate(raw).applications
    assert application.import_path == "imgcls_dist.serve:app"
    ServeSettings(**application.args)  # unknown or bad args raise
    assert [d.name for d in application.deployments] == [DEPLOYMENT, INGRESS]
    assert raw["http_options"]["host"] == ("127.0.0.1" if name.startswith("configs") else "0.0.0.0")
    if name.startswith("rayservice"):
        assert service["spec"]["rayClusterConfig"]["rayVersion"] == ray.__version__
        assert application.deployments[0].ray_actor_options.num_gpus == 1
