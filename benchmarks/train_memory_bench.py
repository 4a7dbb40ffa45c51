"""`python -m benchmarks train-memory`: a training worker's memory over an epoch, as a user's monitoring sees it.

Per process, sampled over time: the training process and each DataLoader process, their anonymous memory
(RssAnon from /proc/PID/status: mapped file pages do not count) and its proportional share (Pss_Anon from
/proc/PID/smaps_rollup: a page a forked DataLoader process still shares with its parent counts half in each,
where RssAnon counts it whole in both). Incompressible rows (random-noise PNGs of 256 px, ~190 KB each, as
photos are), two dataset sizes and two row-group sizes:

- the input path alone, in one process (`train.data.make_train_loader`: the shard reader thread, the shuffle
  buffer, DataLoader processes decoding and augmenting), where the rows consumed are known exactly: the slope
  of memory over GB streamed after warm-up (the first quarter of the epoch), per process and summed;
- one epoch of a real `imgcls-dist train` (lenet5, 2 Train workers), sampling every process titled
  `ray::RayTrainWorker` (their DataLoader processes carry the same title): the summed peaks, and their ratio
  at 4x the data.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from benchmarks.common import Sampled, machine, print_table
from imgcls_dist.data.schema import DATASET_FILE, SHARD_SCHEMA

ROOT = Path(__file__).resolve().parents[1]
CLASSES = [str(i) for i in range(10)]


# ---------------------------------------------------------------- data


def noise_pngs(distinct: int, side: int = 256, seed: int = 0) -> list[bytes]:
    """Random-noise PNGs: incompressible, so bytes on disk are bytes in memory."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(distinct):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buf, "PNG", compress_level=1)
        out.append(buf.getvalue())
    return out


def write_split(out: Path, rows: int, row_group_rows: int, images: list[bytes], rows_per_file: int = 2000) -> None:
    """`rows` rows cycling through `images` (each row its own Python bytes object once read, as a real
    dataset's), in files of `rows_per_file` rows and row groups of `row_group_rows` rows; no dictionary
    encoding, so a repeated image is stored again."""
    out.mkdir(parents=True, exist_ok=True)
    for start in range(0, rows, rows_per_file):
        n = min(rows_per_file, rows - start)
        t = pa.table({"id": [f"r{start + i:08d}" for i in range(n)],
                      "image": pa.array([images[(start + i) % len(images)] for i in range(n)], pa.binary()),
                      "label": pa.array([(start + i) % len(CLASSES) for i in range(n)], pa.int64())},
                     schema=SHARD_SCHEMA)
        pq.write_table(t, out / f"part-{start // rows_per_file:05d}.parquet", row_group_size=row_group_rows,
                       use_dictionary=False)


def write_dataset(out: Path, train_rows: int, row_group_rows: int, images: list[bytes]) -> Path:
    counts = {"train": train_rows, "val": 256, "test": 64}
    for split, rows in counts.items():
        write_split(out / split, rows, row_group_rows, images)
    (out / DATASET_FILE).write_text(json.dumps({"classes": CLASSES, "counts": counts, "hflip": True}))
    return out


# ---------------------------------------------------------------- sampling /proc


def _field(path: str, name: str) -> int:
    """A kB field of /proc/PID/status or smaps_rollup, in bytes (0 once the process is gone)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(name):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def process_memory(pid: int) -> dict[str, int]:
    return {"anon": _field(f"/proc/{pid}/status", "RssAnon:"), "pss": _field(f"/proc/{pid}/smaps_rollup", "Pss_Anon:")}


def slope_mb_per_gb(gb: np.ndarray, mb: np.ndarray) -> float:
    """Least-squares slope of memory (MB) over data streamed (GB)."""
    if len(gb) < 3 or np.ptp(gb) == 0:
        return float("nan")
    return float(np.polyfit(gb, mb, 1)[0])


# ---------------------------------------------------------------- the input path alone, in one process


def stream_epoch(files: list[str], loader_workers: int = 1, shuffle_buffer: int = 256, batch_size: int = 64,
                 image_size: int = 32, warmup: float = 0.25, keep_series: bool = False,
                 interval: float = 0.2) -> dict[str, Any]:
    """One epoch through the training input path in this process; memory per process over GB streamed
    (`keep_series`: also every sample, as [rows done, summed anonymous MB])."""
    from imgcls_dist.data.augment import build_train_transform
    from imgcls_dist.train.data import make_train_loader
    from imgcls_dist.train.stream import list_row_groups

    groups = list_row_groups(files)
    rows = sum(g.rows for g in groups)
    bytes_per_row = sum(os.path.getsize(f) for f in files) / rows
    loader, dataset, sampler = make_train_loader(
        groups, channels=3, transform=build_train_transform("standard", 0.5, image_size, hflip=True, seed=0),
        image_size=image_size, batch_size=batch_size, rank=0, world=1, seed=0, shuffle_buffer=shuffle_buffer,
        loader_workers=loader_workers)
    dataset.set_epoch(0)
    sampler.set_epoch(0)
    me = psutil.Process()
    seen = [0]
    t0 = time.perf_counter()
    pids = lambda: [me.pid] + [c.pid for c in me.children()]  # noqa: E731
    with Sampled(lambda: (seen[0], {p: process_memory(p) for p in pids()}), interval) as s:
        for _, labels, _, _ in loader:
            seen[0] += len(labels)
    seconds = time.perf_counter() - t0
    out = summarize(s.values, me.pid, bytes_per_row, rows, warmup)
    if keep_series:
        out["series"] = [(done, sum(m["anon"] for m in snap.values()) / 2**20) for done, snap in s.values]
    return out | {"samples_per_s": seen[0] / seconds, "samples": seen[0]}


def summarize(series, main_pid: int, bytes_per_row: float, rows: int, warmup: float) -> dict[str, Any]:
    """`series`: [(rows done, {pid: {"anon", "pss"}})] -> peaks, and slopes after the `warmup` share of rows."""
    gb = np.array([done * bytes_per_row / 2**30 for done, _ in series])
    main_anon = np.array([snap.get(main_pid, {}).get("anon", 0) for _, snap in series]) / 2**20
    total_anon = np.array([sum(m["anon"] for m in snap.values()) for _, snap in series]) / 2**20
    total_pss = np.array([sum(m["pss"] for m in snap.values()) for _, snap in series]) / 2**20
    loaders = sorted({p for _, snap in series for p in snap} - {main_pid})
    after = np.array([done >= warmup * rows for done, _ in series]) & (gb > 0)
    return {
        "gb": rows * bytes_per_row / 2**30,
        "main_peak_anon_mb": float(main_anon.max()),
        "loader_peak_anon_mb": [float(max(s.get(p, {}).get("anon", 0) for _, s in series)) / 2**20 for p in loaders],
        "peak_anon_mb": float(total_anon.max()),
        "peak_pss_mb": float(total_pss.max()),
        "main_slope_mb_per_gb": slope_mb_per_gb(gb[after], main_anon[after]),
        "total_slope_mb_per_gb": slope_mb_per_gb(gb[after], total_anon[after]),
        "pss_slope_mb_per_gb": slope_mb_per_gb(gb[after], total_pss[after]),
    }


# ---------------------------------------------------------------- one epoch of real Train


def train_epoch(dataset: str, workdir: str, workers: int = 2, shuffle_buffer: int = 256) -> dict[str, Any]:
    """`imgcls-dist train` for one lenet5 epoch; the summed memory of every Train worker process."""
    title = "RayTrainWorker"

    def pids() -> list[int]:
        found = []
        for p in psutil.process_iter(["cmdline"]):
            try:
                if title in " ".join(p.info["cmdline"] or []):
                    found.append(p.pid)
            except psutil.Error:
                continue
        return found

    cmd = [str(Path(sys.executable).with_name("imgcls-dist")), "train",
           "--config", str(ROOT / "configs/lenet5_digits.yaml"),
           "--set", f"data.path={dataset}", "--set", "train.epochs=1", "--set", "train.warmup_epochs=0",
           "--set", f"scaling.num_workers={workers}", "--set", f"data.shuffle_buffer={shuffle_buffer}",
           "--set", f"run.storage_path={workdir}", "--set", f"run.name=memory-{Path(dataset).name}",
           "--set", "run.tensorboard=false"]  # a name per dataset: Train resumes a finished run of the same name
    with Sampled(lambda: {p: process_memory(p) for p in pids()}, 0.3) as s:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if out.returncode:
        raise RuntimeError(f"train failed: {out.stderr[-2000:]}")
    anon = [sum(m["anon"] for m in snap.values()) / 2**20 for snap in s.values]
    pss = [sum(m["pss"] for m in snap.values()) / 2**20 for snap in s.values]
    per_process = {}
    for snap in s.values:
        for pid, m in snap.items():
            per_process[pid] = max(per_process.get(pid, 0.0), m["anon"] / 2**20)
    return {"peak_anon_mb": max(anon), "peak_pss_mb": max(pss),
            "process_peaks_anon_mb": sorted((round(v) for v in per_process.values() if v > 50), reverse=True)}


# ---------------------------------------------------------------- the benchmark


def _in_child(func: str, *args) -> Any:
    """`func(*args)` of this module in a fresh interpreter (no memory left over from the previous step)."""
    code = ("import json, sys; import benchmarks.train_memory_bench as b; "
            f"print(json.dumps(b.{func}(*json.loads(sys.argv[1]))))")
    out = subprocess.run([sys.executable, "-c", code, json.dumps(args)], check=True, capture_output=True, text=True,
                         cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_train_memory(rows: tuple[int, int] = (5000, 20000), row_groups: tuple[int, ...] = (128, 512),
                       loader_workers: int = 1, shuffle_buffer: int = 256, train: bool = True) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="bench-train-memory-"))
    images = noise_pngs(512)
    table = []
    try:
        for rg in row_groups:
            for n in rows:
                data = write_dataset(work / f"rg{rg}-{n}", n, rg, images)
                files = sorted(str(f) for f in (data / "train").glob("*.parquet"))
                st = _in_child("stream_epoch", files, loader_workers, shuffle_buffer)
                tr = _in_child("train_epoch", str(data), str(work / "runs"), 2, shuffle_buffer) if train else {}
                table.append({"row_group": rg, "rows": n, "gb": st["gb"], "samples_per_s": st["samples_per_s"],
                              "main_peak_mb": st["main_peak_anon_mb"], "peak_anon_mb": st["peak_anon_mb"],
                              "peak_pss_mb": st["peak_pss_mb"], "main_slope": st["main_slope_mb_per_gb"],
                              "total_slope": st["total_slope_mb_per_gb"], "pss_slope": st["pss_slope_mb_per_gb"],
                              "train_peak_anon_mb": tr.get("peak_anon_mb"), "train_peak_pss_mb": tr.get("peak_pss_mb"),
                              "train_processes_mb": tr.get("process_peaks_anon_mb")})
                shutil.rmtree(data)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ratios = {}
    for rg in row_groups:
        small, big = (r for r in table if r["row_group"] == rg)
        ratios[rg] = {k: big[k] / small[k] for k in ("peak_anon_mb", "peak_pss_mb", "train_peak_anon_mb",
                                                      "train_peak_pss_mb") if small[k]}
    print(f"training input memory, {loader_workers} DataLoader process(es), shuffle buffer {shuffle_buffer} "
          f"({machine()}); slopes in MB per GB streamed after the first quarter of the epoch:")
    print_table(table, [c for c in table[0] if c != "train_processes_mb"])
    for rg, r in ratios.items():
        print(f"row groups of {rg}: {rows[1] / rows[0]:g}x the data -> " +
              ", ".join(f"{k} x{v:.2f}" for k, v in r.items()))
    return {"machine": machine(), "rows": table, "ratios": ratios}
