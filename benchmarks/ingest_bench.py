"""Ingest benchmark: ratios measured in one run, on a generated tree of JPEGs.

- speed-up = files/s of `ingest` (listing + Ray tasks that read, check and write shards) / files/s of a
  single-process loop doing the same work on the same tree (the same plan, shard after shard, no Ray; timed
  in a child process). Goal >= 1.6 on 2 CPUs. Ray is started before either is timed; each side's wall time
  is end to end. Trees and shards live on a RAM disk (/dev/shm) when there is one.
- driver memory = peak RSS of this (driver) process during the ingest of the largest tree / of the smallest.
  Goal <= 1.2: the driver holds the listing (paths and labels), never the image bytes.
- `bench_storage`: train and infer throughput reading from a loopback S3 server (moto_server) / from local
  disk, same data, same job (for the record; no goal).
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import psutil
from PIL import Image

from benchmarks.common import Sampled, machine, print_table


def make_jpeg_tree(root: Path, files: int, size: tuple[int, int] = (500, 375), classes: int = 10, seed: int = 0,
                   distinct: int = 128) -> Path:
    """`files` JPEGs in root/<class>/ at ImageNet's typical 500x375: smooth random colour fields with fine
    noise (~50 KB each, decoded in ~2.5 ms like a photo of that size). `distinct` different images are
    encoded and written round-robin (encoding each file anew would take longer than the benchmark)."""
    rng = np.random.default_rng(seed)
    noise = rng.integers(-12, 13, (size[1], size[0], 3), dtype=np.int16)
    encoded = []
    for i in range(distinct):
        small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        smooth = np.asarray(Image.fromarray(small).resize(size, Image.BICUBIC), np.int16)
        buf = io.BytesIO()
        Image.fromarray(np.clip(smooth + np.roll(noise, i, axis=1), 0, 255).astype(np.uint8)).save(
            buf, format="JPEG", quality=90)
        encoded.append(buf.getvalue())
    for c in range(classes):
        (root / f"class_{c:02d}").mkdir(parents=True, exist_ok=True)
    for i in range(files):
        (root / f"class_{i % classes:02d}" / f"{i:07d}.jpg").write_bytes(encoded[i % distinct])
    return root


def single_process_ingest(src: Path, out: Path, rows_per_shard: int) -> int:
    """The baseline: the same listing, split, shard plan and per-shard work (read, decode check, write) as
    `ingest`, one shard after another in this process, with no Ray. The ratio is then what the parallel tasks
    buy, not what the old hold-everything-in-the-driver loop cost."""
    from imgcls_dist.data.ingest import _plan_tree, write_image_shard
    from imgcls_dist.storage import location

    src_loc = location(src)
    _, plan = _plan_tree(src_loc, location(out), (0.7, 0.15, 0.15), rows_per_shard, 0)
    return sum(write_image_shard(src_loc.uri, items, dest)["rows"] for _, items, dest in plan)


def _single_process_seconds(src: Path, out: Path, rows_per_shard: int) -> float:
    """The baseline, timed in a child process (so this driver never holds the rows it reads)."""
    import subprocess
    import sys

    code = ("import sys, time; from pathlib import Path; from benchmarks.ingest_bench import "
            "single_process_ingest as f; t = time.perf_counter(); f(Path(sys.argv[1]), Path(sys.argv[2]), "
            "int(sys.argv[3])); print(time.perf_counter() - t)")
    out_s = subprocess.run([sys.executable, "-c", code, str(src), str(out), str(rows_per_shard)], check=True,
                           capture_output=True, text=True).stdout
    return float(out_s.strip().splitlines()[-1])


def _scratch() -> Path:
    """A RAM disk when there is one: the VM's disk (seen: 50% iowait while a tree is written) must not
    decide a comparison of CPU work."""
    shm = Path("/dev/shm")
    return Path(tempfile.mkdtemp(prefix="bench-ingest-", dir=shm if shm.is_dir() else None))


def bench_ingest(files: Sequence[int] = (10_000, 40_000), rows_per_shard: int = 500) -> dict[str, Any]:
    from imgcls_dist.data.ingest import ingest
    from imgcls_dist.ray_utils import ensure_ray

    ensure_ray()
    work = _scratch()
    rows = []
    try:
        for n in files:
            src = make_jpeg_tree(work / f"src{n}", n)
            with Sampled(lambda: psutil.Process().memory_info().rss, 0.05) as driver_rss:
                t0 = time.perf_counter()
                meta = ingest(str(src), work / f"ray{n}", rows_per_shard=rows_per_shard, verbose=False)
                ray_s = time.perf_counter() - t0
            assert sum(meta["counts"].values()) == n
            single_s = _single_process_seconds(src, work / f"single{n}", rows_per_shard)
            rows.append({"files": n, "single_files_per_s": n / single_s, "ray_files_per_s": n / ray_s,
                         "speedup": single_s / ray_s, "driver_peak_rss_mb": max(driver_rss.values) / 2**20,
                         "ray_worker_processes": meta["ingest"]["worker_processes"]})
            for d in (src, work / f"ray{n}", work / f"single{n}"):
                shutil.rmtree(d, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {"machine": machine(), "rows": rows, "speedup": rows[-1]["speedup"],
              "driver_rss_ratio": rows[-1]["driver_peak_rss_mb"] / rows[0]["driver_peak_rss_mb"]}
    print(f"ingest of a tree of 500x375 JPEGs ({machine()}):")
    print_table(rows, ["files", "single_files_per_s", "ray_files_per_s", "speedup", "driver_peak_rss_mb",
                       "ray_worker_processes"])
    print(f"Ray ingest / single process: {result['speedup']:.2f}x files/s (goal >= 1.6); driver peak RSS "
          f"{files[-1]} / {files[0]} files: {result['driver_rss_ratio']:.2f} (goal <= 1.2)")
    return result


def bench_storage(train_rows: int = 1200, infer_rows: int = 4000) -> dict[str, Any]:
    """Train and infer throughput, same data on local disk and on a loopback moto_server."""
    import subprocess
    import sys

    from benchmarks.infer_bench import make_bench_model
    from imgcls_dist.config import load_config
    from imgcls_dist.data.ingest import ingest
    from imgcls_dist.data.synthetic import write_synthetic_shards
    from imgcls_dist.batch.pipeline import run_batch_inference
    from imgcls_dist.ports import free_port, wait_listening
    from imgcls_dist.ray_utils import ensure_ray
    from imgcls_dist.train.job import run_training

    port = free_port()
    server = subprocess.Popen([str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.environ.update({"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "bench",
                       "AWS_SECRET_ACCESS_KEY": "bench", "AWS_REGION": "us-east-1"})
    work = Path(tempfile.mkdtemp(prefix="bench-storage-"))
    try:
        wait_listening(port, server, "moto_server")
        import pyarrow.fs as pafs

        pafs.S3FileSystem(endpoint_override=f"http://127.0.0.1:{port}", region="us-east-1",
                          allow_bucket_creation=True).create_dir("bench")
        ensure_ray()  # after the environment points at the server: workers inherit it
        fractions = (train_rows / 1797, 0.1, 1 - train_rows / 1797 - 0.1)
        for where, root in (("local", str(work)), ("s3", "s3://bench")):
            ingest("builtin:digits", f"{root}/digits", image_size=32, fractions=fractions, verbose=False)
            write_synthetic_shards(f"{root}/rows", infer_rows, size=32, rows_per_shard=500)
        model, _ = make_bench_model(work / "model", "lenet5", 32)
        rows = []
        for where, root in (("local", str(work)), ("s3", "s3://bench")):
            cfg = load_config(None, [f"data.path={root}/digits", "model.arch=lenet5", "train.epochs=2",
                                     "data.loader_workers=1", "scaling.num_workers=1", "run.tensorboard=false",
                                     f"run.name=storage_{where}", f"run.storage_path={root}/runs"])
            t0 = time.perf_counter()
            res = run_training(cfg, report_test=False)
            train_s = time.perf_counter() - t0
            m = run_batch_inference([model], f"{root}/rows", f"{root}/preds", tta="none", verbose=False)
            rows.append({"storage": where, "train_wall_s": train_s,
                         "train_img_per_s": max(h["images_per_s"] for h in res["history"]),
                         "infer_wall_s": m["wall_s"], "infer_img_per_s": m["images_per_s"]})
    finally:
        server.terminate()
        server.wait(10)
        shutil.rmtree(work, ignore_errors=True)
    local, s3 = rows
    result = {"machine": machine(), "rows": rows,
              "train_wall_ratio_s3_local": s3["train_wall_s"] / local["train_wall_s"],
              "infer_rate_ratio_s3_local": s3["infer_img_per_s"] / local["infer_img_per_s"]}
    print(f"train and infer on local disk vs a loopback S3 server ({machine()}):")
    print_table(rows, ["storage", "train_wall_s", "train_img_per_s", "infer_wall_s", "infer_img_per_s"])
    print(f"S3 / local: train wall {result['train_wall_ratio_s3_local']:.2f}x, infer img/s "
          f"{result['infer_rate_ratio_s3_local']:.2f}x (for the record)")
    return result
