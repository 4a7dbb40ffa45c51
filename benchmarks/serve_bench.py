"""`python -m benchmarks serve`: the online API under a bounded load on loopback, against in-process `predict`.

One run starts the Serve app (`serve/local.py::start_app`, one replica of `--cpus` CPUs, the way
`imgcls-dist serve` starts it) on a random-init resnet18 at 224 px, then for each concurrency level sends a
fixed number of POST /predict requests from that many client threads (each with its own keep-alive
connection), stopping early at a time limit. Printed per level: latency p50/p90/p99, requests/s and failed
requests; and two ratios measured in the same run:

- overhead = p50 at concurrency 1 / p50 of in-process `predict_with` on the same image with the same torch
  thread count as the replica (goal <= 1.3: HTTP + Serve + batching add at most 30%);
- batching gain = requests/s at the highest concurrency / at concurrency 1 (goal >= 2), printed beside
  what batching gains the forward alone (images/s at max_batch_size / at 1, in process).

The load generator is a few lines of http.client rather than a tool like locust or wrk: neither is a
dependency here, and a fixed request count with per-request latencies is all that is needed.
"""

from __future__ import annotations

import http.client
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Sequence
from urllib.parse import urlsplit

import torch

from benchmarks.common import items_per_second, machine, print_table
from benchmarks.infer_bench import make_bench_model
from imgcls_dist.ports import free_port


def _percentile(sorted_ms: list[float], q: float) -> float:
    return sorted_ms[min(len(sorted_ms) - 1, int(q * len(sorted_ms)))]


def load(url: str, body: bytes, *, concurrency: int, requests: int, time_limit_s: float) -> dict[str, Any]:
    """`requests` POSTs of `body` to `url` from `concurrency` threads, or fewer if `time_limit_s` passes."""
    u = urlsplit(url)
    host, port = u.hostname, u.port
    lock, latencies, failures = threading.Lock(), [], []
    sent = [0]
    deadline = time.perf_counter() + time_limit_s

    def client() -> None:
        conn = http.client.HTTPConnection(host, port, timeout=60)
        while True:
            with lock:
                if sent[0] >= requests or time.perf_counter() > deadline:
                    break
                sent[0] += 1
            t0 = time.perf_counter()
            try:
                conn.request("POST", "/predict", body=body, headers={"Content-Type": "image/png"})
                r = conn.getresponse()
                r.read()
                ok = r.status == 200
                what = f"HTTP {r.status}"
            except (OSError, http.client.HTTPException) as e:
                ok, what = False, type(e).__name__
                conn.close()
                conn = http.client.HTTPConnection(host, port, timeout=60)
            ms = (time.perf_counter() - t0) * 1e3
            with lock:
                (latencies if ok else failures).append(ms if ok else what)
        conn.close()

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = sorted(latencies)
    return {"concurrency": concurrency, "requests": len(lat) + len(failures), "failed": len(failures),
            "failures": sorted(set(failures)), "wall_s": round(wall, 2),
            "req_per_s": round(len(lat) / wall, 2) if wall > 0 else None,
            "p50_ms": round(_percentile(lat, 0.5), 1) if lat else None,
            "p90_ms": round(_percentile(lat, 0.9), 1) if lat else None,
            "p99_ms": round(_percentile(lat, 0.99), 1) if lat else None}


def in_process_latency(model_path: Path, image: Path, *, threads: int, repeats: int,
                       batch: int) -> dict[str, float]:
    """Median / min latency of `predict_with` on one image file, with the replica's torch thread count, and
    the forward alone at batch 1 and `batch`: how much batching can gain before HTTP's share is counted."""
    import numpy as np

    from imgcls_dist.predictor.predict import load_predictor, predict_with

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        predictor = load_predictor(model_path, tta="none", batch_size=batch)
        for _ in range(3):
            predict_with(predictor, [image])
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            predict_with(predictor, [image])
            times.append((time.perf_counter() - t0) * 1e3)
        rates = {}
        for b in (1, batch):
            x = {k: np.zeros((b, k[0], k[0], k[1]), np.uint8) for k in predictor.input_keys}
            predictor.predict_uint8(x)
            rates[b] = b * items_per_second(predictor.predict_uint8, [x], 3.0)  # forwards/s x images each
    finally:
        torch.set_num_threads(before)
    return {"median_ms": round(statistics.median(times), 2), "min_ms": round(min(times), 2),
            "forward_batch_gain": round(rates[batch] / rates[1], 2)}


def bench_serve(*, arch: str = "resnet18", image_size: int = 224, concurrency: Sequence[int] = (1, 16),
                requests: int = 200, time_limit_s: float = 60.0, cpus: float = 1.0, max_batch_size: int = 16,
                batch_wait_s: float | None = None, workdir: str | Path | None = None) -> dict[str, Any]:
    from ray import serve

    from imgcls_dist.data.builtin import digits_images, encode_png
    from imgcls_dist.serve.local import start_app
    from imgcls_dist.serve.settings import ServeSettings

    work = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="serve-bench-"))
    model_path, size = make_bench_model(work, arch, image_size)
    image = work / "digit.png"
    image.write_bytes(encode_png(digits_images(size)[0][0]))
    body = image.read_bytes()
    threads = max(1, int(cpus))

    settings = ServeSettings(models=[str(model_path)], tta="none", max_batch_size=max_batch_size,
                             **({} if batch_wait_s is None else {"batch_wait_timeout_s": batch_wait_s}))
    url = start_app(settings, port=free_port(), cpus=cpus, replicas=1)
    try:
        # In-process baseline with Serve up and idle: its controller and proxy load the box as during the load.
        baseline = in_process_latency(model_path, image, threads=threads, repeats=30, batch=max_batch_size)
        load(url, body, concurrency=2, requests=10, time_limit_s=30)  # warm-up: first batches, connections
        levels = [load(url, body, concurrency=c, requests=requests, time_limit_s=time_limit_s) for c in concurrency]
    finally:
        serve.shutdown()

    c1 = next((lv for lv in levels if lv["concurrency"] == 1), None)
    top = max(levels, key=lambda lv: lv["concurrency"])
    result = {
        "machine": machine(), "arch": arch, "image_size": size, "replica_cpus": cpus, "torch_threads": threads,
        "max_batch_size": max_batch_size,
        "batch_wait_timeout_s": settings.batch_wait_timeout_s, "in_process": baseline, "levels": levels,
        "overhead_p50_c1_vs_in_process": round(c1["p50_ms"] / baseline["median_ms"], 3) if c1 and c1["p50_ms"] else None,
        "batching_gain": round(top["req_per_s"] / c1["req_per_s"], 2) if c1 and c1["req_per_s"] else None,
        "failed": sum(lv["failed"] for lv in levels),
    }
    print(f"serve bench: {arch}@{size}px, 1 replica x {cpus:g} CPU, max batch {max_batch_size}, batch wait "
          f"{settings.batch_wait_timeout_s * 1e3:g} ms; {machine()}")
    print(f"in-process predict ({threads} torch thread(s)): median {baseline['median_ms']:.1f} ms, "
          f"min {baseline['min_ms']:.1f} ms; forward alone at batch {max_batch_size} vs 1: "
          f"{baseline['forward_batch_gain']}x images/s")
    print_table(levels, ["concurrency", "requests", "failed", "req_per_s", "p50_ms", "p90_ms", "p99_ms"])
    print(f"overhead p50(c=1) / in-process median: {result['overhead_p50_c1_vs_in_process']} (goal <= 1.3); "
          f"req/s c={top['concurrency']} / c=1: {result['batching_gain']} (goal >= 2); "
          f"failed requests: {result['failed']} (goal 0)")
    return result
