"""`python -m benchmarks precision`: the predictor's CPU forward in fp32, fp32 channels_last and bf16 autocast
(NCHW and channels_last), and what bf16 changes in its answers.

- speed: img/s of `EnsemblePredictor.predict_uint8` (identity view, batch 16, 224 px) on photo-like JPEGs
  (`data.synthetic.photo_jpeg`, 640x480, decoded and resized beforehand: the forward is measured, not the
  decode), random-init resnet18 at 1 and 2 torch threads and resnet50 at 2 (throughput does not depend on the
  weights' values). The arms alternate and each keeps its best round (a neighbour process on a shared
  machine slows every arm's worst round). Beside img/s, img per CPU-second of this process: at one thread it
  is what a neighbour's load cannot lengthen (at two, OpenMP's waiting threads count too). Ratios are against
  fp32 NCHW, what the predictor ran on CPUs before `--precision`.
- agreement: the digits test split through trained models (lenet5_digits and resnet18_digits, trained for
  EPOCHS epochs by the real training job on the first run and reused after, or `--models`), each in fp32 and in
  bf16 as the predictor runs them (no TTA): top-1 agreement, the largest and the mean absolute difference of a
  class probability, and each precision's test accuracy.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from benchmarks.common import machine, print_table

BATCH = 16
SIZE = 224
SPEED_CASES = (("resnet18", 1), ("resnet18", 2), ("resnet50", 2))  # (arch, torch threads)
# arm -> (precision, channels_last)
ARMS = {"fp32": ("fp32", False), "fp32 channels_last": ("fp32", True), "bf16": ("bf16", False),
        "bf16 channels_last": ("bf16", True)}
TRAINED = ("lenet5_digits", "resnet18_digits")
# An epoch on the digits takes seconds; 10 make both real classifiers (test acc ~0.97 and ~0.99), not
# near-uniform guessers whose near-ties would flip under any rounding.
EPOCHS = 10


def _predictor(path: str | Path, precision: str, channels_last: bool, batch_size: int = BATCH):
    """The real predictor in `precision`, its members and inputs switched to the other memory layout when the
    arm asks for the one the predictor does not pick."""
    from imgcls_dist.predictor.predictor import EnsemblePredictor

    pred = EnsemblePredictor([path], views="none", device="cpu", batch_size=batch_size, precision=precision)
    if pred.channels_last != channels_last:
        pred.channels_last = channels_last
        layout = torch.channels_last if channels_last else torch.contiguous_format
        for m in pred.members:
            m.model.to(memory_format=layout)
            m.forward.channels_last = channels_last  # the layout its normalization hands the model
    return pred


def _photo_batch() -> dict[tuple[int, int], np.ndarray]:
    from imgcls_dist.data.builtin import digits_images
    from imgcls_dist.data.synthetic import photo_jpeg
    from imgcls_dist.predictor.prepare import prepare_encoded

    digits, _, _ = digits_images(32)
    photos = [photo_jpeg(digits[i], 640, 480, seed=i) for i in range(BATCH)]
    arrays, errors = prepare_encoded(photos, [(SIZE, 3)])
    assert not any(errors), errors
    return arrays


def _round(fn, batch, seconds: float) -> tuple[float, float]:
    """(calls per wall second, calls per CPU second of this process) over at least `seconds` and 2 calls."""
    n, wall, cpu = 0, time.perf_counter(), time.process_time()
    while n < 2 or time.perf_counter() - wall < seconds:
        fn(batch)
        n += 1
    return n / (time.perf_counter() - wall), n / (time.process_time() - cpu)


def best_rates(fns: dict[str, Any], batch, rounds: int, seconds: float) -> dict[str, tuple[float, float]]:
    """{arm: (best calls/s, best calls per CPU-s)} over `rounds` rounds in which the arms alternate."""
    best = dict.fromkeys(fns, (0.0, 0.0))
    for _ in range(rounds):
        for arm, fn in fns.items():
            best[arm] = tuple(map(max, best[arm], _round(fn, batch, seconds)))
    return best


def measure_cases(work: Path, rounds: int, seconds: float, make_arms: Callable[[Path, dict], dict[str, Any]],
                  baseline: str) -> list[dict[str, Any]]:
    """Every SPEED_CASES model and thread count: {arm: predictor} from `make_arms(model path, batch)` (made after
    the thread count is set), warmed up, timed by best_rates, printed and returned with ratios to `baseline`."""
    from benchmarks.infer_bench import make_bench_model

    batch, rows, saved = _photo_batch(), [], torch.get_num_threads()
    try:
        for arch, threads in SPEED_CASES:
            torch.set_num_threads(threads)
            path, _ = make_bench_model(work, arch, SIZE)
            preds = make_arms(path, batch)
            for p in preds.values():
                p.predict_uint8(batch)  # warm-up: oneDNN builds its kernels on the first call
            rates = best_rates({arm: p.predict_uint8 for arm, p in preds.items()}, batch, rounds, seconds)
            (wall0, cpu0) = rates[baseline]
            case = [{"model": f"{arch}@{SIZE}", "threads": threads, "arm": arm, "img/s": wall * BATCH,
                     f"vs {baseline}": wall / wall0, "img/CPU-s": cpu * BATCH, f"vs {baseline} (CPU)": cpu / cpu0}
                    for arm, (wall, cpu) in rates.items()]
            print_table(case, ["model", "threads", "arm", "img/s", f"vs {baseline}", "img/CPU-s",
                               f"vs {baseline} (CPU)"])
            rows += case
    finally:
        torch.set_num_threads(saved)
    return rows


def speed_rows(work: Path, rounds: int, seconds: float) -> list[dict[str, Any]]:
    return measure_cases(work, rounds, seconds,
                         lambda path, _: {arm: _predictor(path, *spec) for arm, spec in ARMS.items()}, "fp32")


def _dataset(data: str | None, work: Path) -> Path:
    """--data, or builtin:digits ingested into the work directory (once)."""
    from imgcls_dist.data.ingest import ingest

    if data is not None:
        return Path(data)
    out = work / "digits"
    if not (out / "dataset.json").is_file():
        ingest("builtin:digits", out, image_size=32, seed=0, verbose=False)
    return out


def _trained_models(models: Sequence[str] | None, data: Path, work: Path) -> list[str]:
    from benchmarks.ensemble_bench import _train

    if models:
        return list(models)
    return [_train(c, str(data), 0, work, extra=[f"train.epochs={EPOCHS}"], name=f"{c}_e{EPOCHS}") for c in TRAINED]


def _test_probs(path: str, precision: str, data: Path) -> tuple[np.ndarray, np.ndarray]:
    from imgcls_dist.data.schema import split_files
    from imgcls_dist.predictor.predictor import EnsemblePredictor
    from imgcls_dist.predictor.prepare import labelled_batches

    pred = EnsemblePredictor([path], views="none", device="cpu", batch_size=256, precision=precision)
    ys, ps = [], []
    for y, arrays in labelled_batches(split_files(data, "test"), pred.input_keys, 256):
        ok = y >= 0
        ys.append(y[ok])
        ps.append(pred.predict_uint8({k: a[ok] for k, a in arrays.items()}))
    return np.concatenate(ps), np.concatenate(ys)


def agreement_rows(models: Sequence[str], data: Path) -> list[dict[str, Any]]:
    from imgcls_dist.models.checkpoint import load_model_file

    rows = []
    for path in models:
        meta = load_model_file(path)
        (p32, y), (p16, _) = _test_probs(path, "fp32", data), _test_probs(path, "bf16", data)
        diff = np.abs(p16 - p32)
        rows.append({"model": f"{meta['arch']}@{meta['image_size']}", "rows": len(y),
                     "top1 agreement": float((p16.argmax(1) == p32.argmax(1)).mean()),
                     "max |dp|": float(diff.max()), "mean |dp|": float(diff.mean()),
                     "acc fp32": float((p32.argmax(1) == y).mean()), "acc bf16": float((p16.argmax(1) == y).mean())})
    return rows


def bench_precision(models: Sequence[str] | None = None, data: str | None = None,
                    workdir: str = "runs/bench_precision", rounds: int = 3, seconds: float = 1.0,
                    accuracy: bool = True) -> dict[str, Any]:
    from imgcls_dist.predictor.precision import choose_precision, cpu_has_native_bf16

    work = Path(workdir).resolve() if workdir else Path(tempfile.mkdtemp(prefix="precision-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"bench precision: {machine()}; native bf16: {cpu_has_native_bf16()}; "
          f"auto -> {choose_precision('auto', 'cpu')}", flush=True)
    speed = speed_rows(work, rounds, seconds)
    result: dict[str, Any] = {"machine": machine(), "native_bf16": cpu_has_native_bf16(), "speed": speed}
    if accuracy:
        dataset = _dataset(data, work)
        result["agreement"] = agreement_rows(_trained_models(models, dataset, work), dataset)
        print(f"bf16 vs fp32 on {dataset} (test split), no TTA:")
        print_table(result["agreement"], ["model", "rows", "top1 agreement", "max |dp|", "mean |dp|", "acc fp32",
                                          "acc bf16"])
    return result
