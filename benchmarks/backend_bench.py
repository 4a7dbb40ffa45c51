"""`python -m benchmarks backends`: the predictor's CPU forward in torch fp32, torch bf16 (channels_last, what
`--precision auto` runs on CPUs with native bf16), ONNX Runtime fp32 (`--backend onnxruntime`) and ONNX Runtime
int8 (`--precision int8`, static quantization).

- speed: img/s of `EnsemblePredictor.predict_uint8` on the same photo batch and arms-alternate, best-round
  method as `python -m benchmarks precision` (its SPEED_CASES); ratios against torch fp32.
- `predict` latency: one PNG file (decode, resize, forward, top-5) after load, resnet50 at 224 px, per arm.
- agreement: the digits test split through trained lenet5/resnet18 (as that benchmark trains them), each arm
  against torch fp32: top-1 agreement, max |probability difference|, test accuracy.

int8 is calibrated as the predictor does it, on the first CALIBRATION_ROWS images of the digits' validation
split (never the test split; for the 224-px speed rows the digits resized: speed does not depend on it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from benchmarks.common import machine, print_table
from benchmarks.precision_bench import BATCH, _dataset, _trained_models, measure_cases
from imgcls_dist.predictor.options import CALIBRATION_ROWS

# predict's latency for one image file, after load: (label, --precision, --backend)
LATENCY_ARMS = (("torch fp32", "fp32", "torch"), ("torch bf16", "bf16", "torch"),
                ("onnxruntime fp32", "auto", "onnxruntime"), ("onnxruntime int8", "int8", "onnxruntime"))


def predictors(path: str | Path, calibration: Path, batch_size: int) -> dict[str, Any]:
    """The four arms as the predictor runs them (int8: `--precision int8 --calibration <the digits>`)."""
    from imgcls_dist.predictor.predictor import EnsemblePredictor

    kw = dict(views="none", device="cpu", batch_size=batch_size)
    return {"torch fp32": EnsemblePredictor([path], precision="fp32", backend="torch", **kw),
            "torch bf16": EnsemblePredictor([path], precision="bf16", backend="torch", **kw),
            "onnxruntime fp32": EnsemblePredictor([path], backend="onnxruntime", **kw),
            "onnxruntime int8": EnsemblePredictor([path], precision="int8", backend="onnxruntime",
                                                  calibration=calibration, **kw)}


def speed_rows(work: Path, dataset: Path, rounds: int, seconds: float) -> list[dict[str, Any]]:
    return measure_cases(work, rounds, seconds, lambda path, _: predictors(path, dataset, BATCH), "torch fp32")


def latency_rows(work: Path, dataset: Path, arch: str = "resnet50", size: int = 224) -> list[dict[str, Any]]:
    """`predict` of one PNG (decode, resize, forward, top-5) per LATENCY_ARMS, 20 times after 2 warm-ups."""
    from benchmarks.infer_bench import bench_predict_latency

    rows = []
    for label, precision, backend in LATENCY_ARMS:
        r = bench_predict_latency(arch=arch, image_size=size, ttas=("none",), workdir=work, verbose=False,
                                  precision=precision, backend=backend,
                                  calibration=dataset if precision == "int8" else None)["none"]
        rows.append({"model": f"{arch}@{size}", "arm": label, "threads": torch.get_num_threads(),
                     "p50 ms": r["median_ms"], "p90 ms": r["p90_ms"], "min ms": r["min_ms"], "load ms": r["load_ms"]})
    print("predict, one image file, after model load (goal: p50 < 50 ms):")
    print_table(rows, list(rows[0]))
    return rows


def _test_split(data: Path, key) -> tuple[np.ndarray, np.ndarray]:
    from imgcls_dist.data.schema import split_files
    from imgcls_dist.predictor.prepare import labelled_batches

    ys, xs = [], []
    for y, arrays in labelled_batches(split_files(data, "test"), [key], 256):
        ok = y >= 0
        ys.append(y[ok])
        xs.append(arrays[key][ok])
    return np.concatenate(ys), np.concatenate(xs)


def agreement_rows(models: Sequence[str], data: Path) -> list[dict[str, Any]]:
    from imgcls_dist.models.checkpoint import load_model_file

    rows = []
    for path in models:
        meta = load_model_file(path)
        key = (int(meta["image_size"]), int(meta["in_channels"]))
        y, test = _test_split(data, key)
        probs = {arm: p.predict_uint8({key: test}) for arm, p in predictors(path, data, 256).items()}
        ref = probs["torch fp32"]
        for arm, p in probs.items():
            rows.append({"model": f"{meta['arch']}@{meta['image_size']}", "arm": arm, "rows": len(y),
                         "top1 agreement": float((p.argmax(1) == ref.argmax(1)).mean()),
                         "max |dp|": float(np.abs(p - ref).max()), "test acc": float((p.argmax(1) == y).mean())})
    return rows


def bench_backends(models: Sequence[str] | None = None, data: str | None = None,
                   workdir: str = "runs/bench_precision", rounds: int = 3, seconds: float = 1.0,
                   accuracy: bool = True) -> dict[str, Any]:
    from imgcls_dist.predictor.precision import cpu_has_native_bf16

    work = Path(workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    print(f"bench backends: {machine()}; native bf16: {cpu_has_native_bf16()}", flush=True)
    dataset = _dataset(data, work)  # the digits: the int8 arms' calibration, and the agreement rows' test split
    result: dict[str, Any] = {"machine": machine(), "native_bf16": cpu_has_native_bf16(),
                              "speed": speed_rows(work, dataset, rounds, seconds),
                              "predict_latency": latency_rows(work, dataset)}
    if accuracy:
        result["agreement"] = agreement_rows(_trained_models(models, dataset, work), dataset)
        print(f"each arm against torch fp32 on {dataset} (test split), no TTA; int8 calibrated on "
              f"{CALIBRATION_ROWS} validation images:")
        print_table(result["agreement"], ["model", "arm", "rows", "top1 agreement", "max |dp|", "test acc"])
    return result
