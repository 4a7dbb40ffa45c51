"""Batch-inference benchmark: ratios measured in one run, so they hold on any machine.

- pipeline efficiency = images/s of the whole Ray Data job (read, decode, TTA forward, write, publish)
  / the predictor's raw forward throughput on pre-decoded tensors, same model, views, batch size and
  threads, times the number of actors. Goal >= 0.8.
- marginal efficiency = (rows_big - rows_small) / (wall_big - wall_small) / raw: the same ratio with the
  per-job fixed cost (actor start-up imports torch+torchvision: ~5 s idle, 15-20 s on a loaded 2-CPU
  box) cancelled out, i.e. the steady-state streaming rate.
- memory flatness = peak RSS (driver + Ray worker processes, sampled in a thread) at the largest row
  count / at the smallest. Goal <= 1.2: streaming means memory does not grow with rows. PSS is reported
  beside it (see PeakMemory): the RSS sum also moves with how many worker processes are alive.
- `bench_infer_photos`: steady-state (marginal) job img/s on 12 MP photo JPEGs / the same job on 32-px
  thumbnails: what full-size photos cost the job, now that they are decoded at a reduced size.
- `bench_predict_latency`: single-image `predict` latency after the model is loaded (goal < 100 ms).
"""

from __future__ import annotations

import math
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import psutil
import torch

from imgcls_dist.ray_utils import local_raylets

DIGIT_CLASSES = [str(i) for i in range(10)]
# The demo's default TTA for digits (standard-preset training): bench models are written without a
# training config, which would make their default view set identity only.
BENCH_TTA = "identity,shift_left,shift_right,shift_up,shift_down,zoom_in"


def make_bench_model(out_dir: str | Path, arch: str = "lenet5", image_size: int | None = None) -> tuple[Path, int]:
    """A random-init model file for `arch` (throughput does not depend on the weights' values)."""
    from imgcls_dist.models.checkpoint import save_model_file
    from imgcls_dist.models.registry import get_model, get_spec

    spec = get_spec(arch)
    size = int(image_size or spec.default_size)
    torch.manual_seed(0)
    model = get_model(arch, num_classes=len(DIGIT_CLASSES), in_channels=3)
    mean, std = spec.normalization(3)
    path = save_model_file(Path(out_dir) / f"{arch}-{size}", model=model, arch=arch, classes=DIGIT_CLASSES,
                           in_channels=3, image_size=size, mean=list(mean), std=list(std), hflip=False)
    return path, size


class PeakMemory:
    """Peaks of the summed RSS and PSS of this process and the worker processes of *our* Ray node.

    Workers are the children of the raylet started with our GCS address (matching "ray::" titles would
    also count other Ray instances on the machine). RSS sums count shared pages once per process: every
    worker maps ~0.6 GB of torch/torchvision libraries, so the RSS sum mostly counts processes. PSS
    splits shared pages between the processes mapping them; its sum is the memory really in use.
    """

    def __init__(self, interval_s: float = 0.25, pss_every: int = 4):
        # PSS walks page tables (~50 ms for a 1.4 GB worker, ~90 ms per sample of a whole node here), so it
        # is sampled every `pss_every` ticks; RSS (statm) is cheap. This keeps the sampler at a few % of
        # one core instead of perturbing the job it measures.
        self.interval_s, self.pss_every = interval_s, pss_every
        self.peak_rss = self.peak_pss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._raylets = local_raylets()

    def _procs(self) -> set[psutil.Process]:
        procs = {psutil.Process()}
        for raylet in self._raylets:
            try:
                procs.update(raylet.children(recursive=True))
            except psutil.Error:
                pass
        return procs

    def sample(self, pss: bool = True) -> tuple[int, int]:
        """(summed RSS, summed PSS or 0) over the process group now."""
        rss_total = pss_total = 0
        for p in self._procs():
            try:
                if pss:
                    info = p.memory_full_info()
                    pss_total += getattr(info, "pss", info.rss)
                else:
                    info = p.memory_info()
            except psutil.Error:  # exited between listing and sampling
                continue
            rss_total += info.rss
        return rss_total, pss_total

    def _update(self, pss: bool) -> None:
        rss, pss_total = self.sample(pss)
        self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss_total)

    def _run(self) -> None:
        tick = 0
        while not self._stop.is_set():
            self._update(pss=tick % self.pss_every == 0)
            tick += 1
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._update(pss=True)


def _inputs(workdir: Path, rows: Sequence[int], size: int, seed: int) -> dict[int, list[Path]]:
    """One synthetic set of max(rows) rows, in shards of gcd(rows): each count is a prefix of files."""
    from imgcls_dist.data.synthetic import write_synthetic_shards

    per_shard = math.gcd(*rows)
    if per_shard < 100 or max(rows) // per_shard > 200:
        per_shard = max(100, min(rows))  # counts that share no useful divisor: approximate prefixes
    src = workdir / f"input-{max(rows)}-{size}px-{per_shard}"
    files = sorted(src.glob("*.parquet"))
    if not files:
        files = write_synthetic_shards(src, max(rows), size=size, seed=seed, rows_per_shard=per_shard)
    return {n: files[: max(1, round(n / per_shard))] for n in rows}


def raw_throughput(model_path: Path, tta, batch_size: int, threads: int, seconds: float = 3.0) -> float:
    """Images/s of EnsemblePredictor.predict_uint8 on pre-decoded, pre-resized uint8 batches."""
    from imgcls_dist.data.builtin import digits_images
    from imgcls_dist.predictor.predictor import EnsemblePredictor

    pred = EnsemblePredictor([model_path], views=tta, batch_size=batch_size)
    (size, channels), = pred.input_keys
    imgs, _, _ = digits_images(size)
    batch = np.stack([imgs[i % len(imgs)] for i in range(batch_size)])
    batch = {(size, channels): batch if channels == 3 else batch[..., :1]}
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        pred.predict_uint8(batch)  # warm-up (allocator, oneDNN kernels)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            pred.predict_uint8(batch)
            n += batch_size
        return n / (time.perf_counter() - t0)
    finally:
        torch.set_num_threads(saved)


def bench_infer(
    *,
    rows: Sequence[int] = (10_000, 50_000),
    arch: str = "lenet5",
    image_size: int | None = 32,
    model: str | Path | None = None,
    tta: str | Sequence[str] | None = BENCH_TTA,
    batch_size: int = 256,
    num_actors: int | None = None,
    workdir: str | Path | None = None,
    seed: int = 0,
    raw_seconds: float = 3.0,
    warmup: bool = True,
    verbose: bool = True,
) -> dict[str, Any]:
    """Run the batch-inference job at each row count; returns and prints the ratios.

    `warmup` runs the smallest input once first, unmeasured: the first job in a fresh Ray starts the
    task workers (each imports torch/torchvision, ~1 GB RSS), later jobs reuse them, so without it the
    first measured size would carry that one-time cost in both wall time and memory.
    """
    from imgcls_dist.batch.pipeline import run_batch_inference
    from imgcls_dist.models.checkpoint import load_model_file
    from imgcls_dist.ray_utils import ensure_ray

    rows = sorted(set(int(r) for r in rows))
    work = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="infer-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    if model is None:
        model_path, size = make_bench_model(work, arch, image_size)
    else:
        model_path = Path(model)
        meta = load_model_file(model_path)
        arch, size = meta["arch"], int(meta["image_size"])
    inputs = _inputs(work, rows, size, seed)

    ensure_ray()
    if warmup:
        run_batch_inference(model_path, inputs[rows[0]], work / "out-warmup", tta=tta, batch_size=batch_size,
                            num_actors=num_actors, verbose=False)
    runs = {}
    for n in rows:
        with PeakMemory() as mem:
            m = run_batch_inference(model_path, inputs[n], work / f"out-{n}", tta=tta, batch_size=batch_size,
                                    num_actors=num_actors, verbose=False)
        runs[n] = {"rows": m["rows_in"], "wall_s": m["wall_s"], "images_per_s": m["images_per_s"],
                   "peak_rss_mb": round(mem.peak_rss / 2**20, 1), "peak_pss_mb": round(mem.peak_pss / 2**20, 1),
                   "views": len(m["tta_views"])}
    # Raw capacity with the pool the job actually ran: per-actor threads x number of actors.
    plan = m["actors"]
    raw = raw_throughput(model_path, tta, batch_size, plan["torch_threads"], raw_seconds) * plan["num_actors"]
    big, small = runs[rows[-1]], runs[rows[0]]
    dwall = big["wall_s"] - small["wall_s"]
    marginal = (big["rows"] - small["rows"]) / dwall if len(rows) > 1 and dwall > 0 else None
    result = {
        "arch": arch, "image_size": size, "views": m["tta_views"], "batch_size": batch_size,
        "actors": plan["num_actors"], "threads_per_actor": plan["torch_threads"],
        "raw_images_per_s": round(raw, 1),
        "job_images_per_s": big["images_per_s"],
        "pipeline_efficiency": round(big["images_per_s"] / raw, 3),
        "marginal_images_per_s": round(marginal, 1) if marginal else None,
        "marginal_efficiency": round(marginal / raw, 3) if marginal else None,
        "rss_ratio": round(big["peak_rss_mb"] / small["peak_rss_mb"], 3),
        "pss_ratio": round(big["peak_pss_mb"] / small["peak_pss_mb"], 3),
        "runs": runs,
        "workdir": str(work),
    }
    if verbose:
        print(format_bench(result))
    return result


def format_bench(r: dict[str, Any]) -> str:
    lines = [
        f"batch inference bench: {r['arch']}@{r['image_size']}px, {len(r['views'])} views, batch {r['batch_size']}, "
        f"{r['actors']} actor(s) x {r['threads_per_actor']} thread(s)",
        f"{'rows':>8} {'wall s':>8} {'img/s':>9} {'peak RSS MB':>12} {'peak PSS MB':>12}",
    ]
    for n, run in r["runs"].items():
        lines.append(f"{n:>8} {run['wall_s']:>8.2f} {run['images_per_s']:>9.1f} {run['peak_rss_mb']:>12.1f}"
                     f" {run['peak_pss_mb']:>12.1f}")
    lines.append(f"raw predictor forward: {r['raw_images_per_s']:.1f} img/s (same views/batch/threads x actors)")
    lines.append(f"pipeline efficiency (job / raw): {r['pipeline_efficiency']:.3f}  (goal >= 0.8)")
    if r["marginal_efficiency"] is not None:
        lines.append(f"marginal efficiency (extra rows / extra wall time / raw): {r['marginal_efficiency']:.3f}"
                     f"  ({r['marginal_images_per_s']:.1f} img/s)")
    lines.append(f"peak RSS ratio (largest / smallest rows): {r['rss_ratio']:.3f}  (goal <= 1.2); "
                 f"PSS ratio {r['pss_ratio']:.3f}")
    return "\n".join(lines)


def _photo_inputs(workdir: Path, rows: Sequence[int], distinct: int = 8, per_shard: int = 25,
                  size: tuple[int, int] = (4000, 3000)) -> dict[int, list[Path]]:
    """max(rows) rows of photo JPEGs (`data.synthetic.photo_jpeg`; 12 MP, ~1.3 MB each, by default): `distinct`
    different photos repeated (a repeat costs the job what a new photo does; making a 12 MP one takes ~0.7 s),
    in shards of `per_shard` rows; each count is a prefix of files."""
    from imgcls_dist.data.builtin import digits_images
    from imgcls_dist.data.shards import write_shards
    from imgcls_dist.data.synthetic import photo_jpeg

    src = workdir / f"photos-{size[0]}x{size[1]}-{max(rows)}-{per_shard}"
    files = sorted(src.glob("*.parquet"))
    if not files:
        digits, labels, _ = digits_images(32)
        photos = [photo_jpeg(digits[i], *size, seed=i) for i in range(distinct)]
        rows_iter = ((f"photo-{i:06d}", photos[i % distinct], int(labels[i % distinct])) for i in range(max(rows)))
        write_shards(rows_iter, src, rows_per_shard=per_shard, prefix="photo")
        files = sorted(src.glob("*.parquet"))
    return {n: files[: max(1, round(n / per_shard))] for n in rows}


def _marginal_rate(model_path: Path, inputs: dict[int, list[Path]], out: Path, **job) -> tuple[float, dict]:
    """(extra rows / extra wall time between the smallest and largest input, {rows: job img/s})."""
    from imgcls_dist.batch.pipeline import run_batch_inference

    runs = {n: run_batch_inference(model_path, files, out / f"out-{n}", verbose=False, **job)
            for n, files in sorted(inputs.items())}
    small, big = runs[min(runs)], runs[max(runs)]
    return ((big["rows_in"] - small["rows_in"]) / (big["wall_s"] - small["wall_s"]),
            {n: m["images_per_s"] for n, m in runs.items()})


def bench_infer_photos(
    *,
    rows: Sequence[int] = (100, 300),
    thumb_rows: Sequence[int] = (10_000, 50_000),
    arch: str = "lenet5",
    image_size: int = 32,
    tta: str | Sequence[str] | None = BENCH_TTA,
    batch_size: int = 64,
    workdir: str | Path | None = None,
    verbose: bool = True,
) -> dict[str, Any]:
    """The same job (model, views, batch size, actor plan) on 12 MP photos and on 32-px digit thumbnails; rates
    are marginal (as in bench_infer) because the photo runs are short enough for start-up to dominate."""
    from imgcls_dist.batch.pipeline import run_batch_inference
    from imgcls_dist.ray_utils import ensure_ray

    work = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="infer-photo-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    model_path, size = make_bench_model(work, arch, image_size)
    thumbs, photos = _inputs(work, thumb_rows, size, seed=0), _photo_inputs(work, rows)
    ensure_ray()
    job = {"tta": tta, "batch_size": batch_size}
    run_batch_inference(model_path, thumbs[min(thumb_rows)], work / "warmup", verbose=False, **job)  # see bench_infer
    thumb_rate, thumb_runs = _marginal_rate(model_path, thumbs, work / "thumbs", **job)
    photo_rate, photo_runs = _marginal_rate(model_path, photos, work / "photos", **job)
    result = {"arch": arch, "image_size": size, "batch_size": batch_size, "photo_images_per_s": round(photo_rate, 1),
              "thumb_images_per_s": round(thumb_rate, 1), "ratio": round(photo_rate / thumb_rate, 4),
              "photo_runs": photo_runs, "thumb_runs": thumb_runs, "workdir": str(work)}
    if verbose:
        print(f"batch inference on 12 MP photos vs 32-px thumbnails, {arch}@{size}px, batch {batch_size}: "
              f"marginal job img/s {result['photo_images_per_s']} (photos, {'/'.join(map(str, rows))} rows) vs "
              f"{result['thumb_images_per_s']} (thumbnails, {'/'.join(map(str, thumb_rows))} rows): "
              f"ratio {result['ratio']:.3f}")
    return result


def bench_predict_latency(
    *,
    arch: str = "resnet18",
    image_size: int | None = None,
    ttas: Sequence[str] = ("none", BENCH_TTA),
    repeats: int = 20,
    workdir: str | Path | None = None,
    verbose: bool = True,
    precision: str = "auto",
    backend: str = "auto",
    calibration: str | Path | None = None,
) -> dict[str, Any]:
    """Median/p90 latency of predicting one PNG file (decode, resize, views, forward) after model load, with
    `predict --precision precision --backend backend --calibration calibration`."""
    from imgcls_dist.data.builtin import digits_images, encode_png
    from imgcls_dist.predictor.predict import load_predictor, predict_with

    work = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="predict-bench-"))
    model_path, size = make_bench_model(work, arch, image_size)
    img = work / "digit.png"
    img.write_bytes(encode_png(digits_images(size)[0][0]))
    result: dict[str, Any] = {"arch": arch, "image_size": size, "threads": torch.get_num_threads()}
    for tta in ttas:
        t0 = time.perf_counter()
        predictor = load_predictor(model_path, tta=tta, batch_size=1, precision=precision, backend=backend,
                                   calibration=calibration)
        load_ms = (time.perf_counter() - t0) * 1e3
        for _ in range(2):
            predict_with(predictor, [img], topk=5)  # warm-up
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            predict_with(predictor, [img], topk=5)
            times.append((time.perf_counter() - t0) * 1e3)
        times.sort()
        # min beside median: on a shared CI box other jobs' bursts inflate the median, not the min
        result[tta] = {"views": len(predictor.views), "load_ms": round(load_ms, 1), "min_ms": round(times[0], 2),
                       "median_ms": round(statistics.median(times), 2),
                       "p90_ms": round(times[min(len(times) - 1, int(0.9 * len(times)))], 2)}
    if verbose:
        print(f"predict latency, {arch}@{size}px, {result['threads']} torch thread(s), {predictor.precision_choice}, "
              f"{predictor.backend_choice}, after model load (goal < 100 ms):")
        for tta in ttas:
            r = result[tta]
            label = "none" if tta == "none" else "on"
            print(f"  tta={label:<4} {r['views']} view(s): median {r['median_ms']:.1f} ms, p90 {r['p90_ms']:.1f} ms, "
                  f"min {r['min_ms']:.1f} ms (load {r['load_ms']:.0f} ms)")
    return result
