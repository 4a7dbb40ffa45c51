"""`python -m benchmarks backends`: the predictor's CPU forward in torch fp32, torch bf16 (channels_last, what
`--precision auto` runs on CPUs with native bf16), ONNX Runtime fp32 (`--backend onnxruntime`) and ONNX Runtime
INT8 (post-training static quantization, not a backend option: measured to decide whether it should be).

- speed: img/s of `EnsemblePredictor.predict_uint8` on the same photo batch and arms-alternate, best-round
  method as `python -m benchmarks precision` (its SPEED_CASES); ratios against torch fp32.
- agreement: the digits test split through trained lenet5/resnet18 (as that benchmark trains them), each arm
  against torch fp32: top-1 agreement, max |probability difference|, test accuracy.

INT8: ONNX Runtime's quantizer on the fp32 member graph (uint8 images in, normalization inside), after its
pre-processing step (`quant_pre_process`: shape inference and graph optimization), QDQ format, per-channel int8
weights, uint8 activations with MinMax calibration: on the validation split for the agreement rows (never the
test split), on the speed batch for the speed rows (speed does not depend on the calibration). The quantized
graph replaces the session of an onnxruntime predictor, so views, softmax and combining are the predictor's.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from benchmarks.common import machine, print_table
from benchmarks.precision_bench import BATCH, _dataset, _trained_models, measure_cases

ARMS = ("torch fp32", "torch bf16", "onnxruntime fp32", "onnxruntime int8")
CALIBRATION_ROWS = 256


def quantize_member(predictor, calibration: Iterator[np.ndarray], work: Path) -> None:
    """Replace the (one) member's ONNX Runtime session by an INT8 static-QDQ one calibrated on `calibration`."""
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from imgcls_dist.predictor.onnx_runtime import LOGITS_INPUT, LOGITS_OUTPUT, UInt8Logits, export_program

    m = predictor.members[0]
    fp32, pre, q = (work / f"member.{s}.onnx" for s in ("fp32", "pre", "int8"))
    export_program(UInt8Logits(m.model, m.meta["mean"], m.meta["std"]), m.key, LOGITS_INPUT, LOGITS_OUTPUT,
                   m.path).save(fp32, external_data=False)
    quant_pre_process(str(fp32), str(pre))

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(calibration)

        def get_next(self):
            x = next(self.it, None)
            return None if x is None else {LOGITS_INPUT: np.ascontiguousarray(x)}

    quantize_static(str(pre), str(q), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    m.forward.session = ort.InferenceSession(str(q), options, providers=["CPUExecutionProvider"])


def _nchw(arrays: dict) -> np.ndarray:
    (x,) = arrays.values()
    return np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2)))


def predictors(path: str | Path, calibration: Sequence[np.ndarray], work: Path, batch_size: int) -> dict[str, Any]:
    from imgcls_dist.predictor.predictor import EnsemblePredictor

    kw = dict(views="none", device="cpu", batch_size=batch_size)
    arms = {"torch fp32": EnsemblePredictor([path], precision="fp32", backend="torch", **kw),
            "torch bf16": EnsemblePredictor([path], precision="bf16", backend="torch", **kw),
            "onnxruntime fp32": EnsemblePredictor([path], backend="onnxruntime", **kw),
            "onnxruntime int8": EnsemblePredictor([path], backend="onnxruntime", **kw)}
    quantize_member(arms["onnxruntime int8"], iter(calibration), work)
    return arms


def speed_rows(work: Path, rounds: int, seconds: float) -> list[dict[str, Any]]:
    def arms(path: Path, batch: dict) -> dict[str, Any]:
        with tempfile.TemporaryDirectory() as tmp:
            return predictors(path, [_nchw(batch)], Path(tmp), BATCH)

    return measure_cases(work, rounds, seconds, arms, "torch fp32")


def _split_arrays(data: Path, split: str, key, max_rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    from imgcls_dist.data.schema import split_files
    from imgcls_dist.predictor.prepare import labelled_batches

    ys, xs = [], []
    for y, arrays in labelled_batches(split_files(data, split), [key], 256, max_rows=max_rows):
        ok = y >= 0
        ys.append(y[ok])
        xs.append(arrays[key][ok])
    return np.concatenate(ys), np.concatenate(xs)


def agreement_rows(models: Sequence[str], data: Path, work: Path) -> list[dict[str, Any]]:
    from imgcls_dist.models.checkpoint import load_model_file

    rows = []
    for path in models:
        meta = load_model_file(path)
        key = (int(meta["image_size"]), int(meta["in_channels"]))
        _, val = _split_arrays(data, "val", key, CALIBRATION_ROWS)
        y, test = _split_arrays(data, "test", key)
        calibration = [np.ascontiguousarray(np.transpose(val[i:i + 32], (0, 3, 1, 2))) for i in range(0, len(val), 32)]
        with tempfile.TemporaryDirectory() as tmp:
            preds = predictors(path, calibration, Path(tmp), 256)
        probs = {arm: p.predict_uint8({key: test}) for arm, p in preds.items()}
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
    result: dict[str, Any] = {"machine": machine(), "native_bf16": cpu_has_native_bf16(),
                              "speed": speed_rows(work, rounds, seconds)}
    if accuracy:
        dataset = _dataset(data, work)
        result["agreement"] = agreement_rows(_trained_models(models, dataset, work), dataset, work)
        print(f"each arm against torch fp32 on {dataset} (test split), no TTA; INT8 calibrated on "
              f"{CALIBRATION_ROWS} validation images:")
        print_table(result["agreement"], ["model", "arm", "rows", "top1 agreement", "max |dp|", "test acc"])
    return result
