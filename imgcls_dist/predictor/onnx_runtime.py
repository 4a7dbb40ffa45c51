"""`--backend onnxruntime`: a member's forward (uint8 views in, logits out) run by ONNX Runtime on the CPU.

When the predictor loads a member it exports the member's network with its normalization in front
(`UInt8Logits`, the same module the torch backend runs) through `torch.onnx.export(..., dynamo=True)` at
opset OPSET, in memory (a few seconds for a ResNet; nothing is written or cached), and opens an ONNX Runtime
session on it with as many intra-op threads as torch has in this process (a batch actor's or replica's CPUs).
Views, temperatures and combining stay in torch, so both backends share every line but the forward.
`imgcls-dist export` writes files through the same `export_program`.

int8 (`--precision int8`): the exported graph is quantized by ONNX Runtime's own tools (`quant_pre_process`:
shape inference and graph optimization; `quantize_static`: QDQ format, per-channel int8 weights, uint8
activations with MinMax ranges) on calibration images the caller gives (the predictor: a validation split),
in a temporary directory, because those tools read and write files. Measured against the other choices:
docs/benchmarks.md, "CPU backends".
"""

from __future__ import annotations

import importlib.util
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from imgcls_dist.errors import JobFailed, UserError
from imgcls_dist.models.preprocess import normalize

OPSET = 18  # the opset torchlib is written in (no version conversion pass); onnxruntime >= 1.14 runs it
BATCH_AXIS = "batch"
# torch.export specializes a dimension whose example value is 0 or 1 into a constant: the example batch
# must be >= 2 for the batch axis to stay symbolic.
EXAMPLE_BATCH = 2
INSTALL_HINT = "pip install 'imgcls-dist[onnx]'"
RUNTIME_MODULES = ("onnx", "onnxscript", "onnxruntime")  # the exporter needs the first two, running the third
LOGITS_INPUT, LOGITS_OUTPUT = "images", "logits"


def missing_runtime_modules() -> list[str]:
    return [m for m in RUNTIME_MODULES if importlib.util.find_spec(m) is None]


def require_runtime(what: str) -> None:
    missing = missing_runtime_modules()
    if missing:
        raise UserError(f"{what} needs {', '.join(missing)}, not installed: {INSTALL_HINT}")


class UInt8Logits(nn.Module):
    """uint8 NCHW -> the network's logits on (x/255 - mean)/std: a member's forward, for both backends."""

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float], channels_last: bool = False):
        super().__init__()
        self.net, self.mean, self.std, self.channels_last = net, list(mean), list(std), channels_last

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(normalize(images, self.mean, self.std, channels_last=self.channels_last))


def export_program(module: nn.Module, key: tuple[int, int], input_name: str, output_name: str, where: str):
    """torch.onnx's ONNXProgram of `module` on uint8 [batch, C, H, W] (key = (size, C)), the batch axis dynamic;
    an exporter failure is a JobFailed naming `where`."""
    size, channels = key
    example = torch.randint(0, 256, (EXAMPLE_BATCH, channels, size, size), dtype=torch.uint8,
                            generator=torch.Generator().manual_seed(0))
    try:
        # dynamic_shapes is keyed by forward()'s parameter name, which is the graph's input name
        return torch.onnx.export(
            module.eval(), (example,), dynamo=True, opset_version=OPSET, input_names=[input_name],
            output_names=[output_name], dynamic_shapes={"images": {0: torch.export.Dim(BATCH_AXIS)}}, verbose=False)
    except Exception as e:  # noqa: BLE001 - torch.export and the ONNX translation raise many types, pages long
        first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), "")[:200]
        raise JobFailed(f"{where}: the ONNX exporter failed ({type(e).__name__}: {first})") from None


CALIBRATION_BATCH = 32


def quantize_int8(program, calibration: np.ndarray) -> bytes:
    """An exported fp32 graph -> the bytes of its static int8 (QDQ) quantization, calibrated on `calibration`
    (uint8 [N, C, H, W] images)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Batches(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(range(0, len(calibration), CALIBRATION_BATCH))

        def get_next(self):
            i = next(self.batches, None)
            return None if i is None else {LOGITS_INPUT: np.ascontiguousarray(calibration[i:i + CALIBRATION_BATCH])}

    with tempfile.TemporaryDirectory(prefix="imgcls-int8-") as tmp:
        fp32, pre, int8 = (Path(tmp) / f"{name}.onnx" for name in ("fp32", "pre", "int8"))
        program.save(fp32, external_data=False)
        quant_pre_process(str(fp32), str(pre))
        quantize_static(str(pre), str(int8), Batches(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        return int8.read_bytes()


class OrtForward:
    """A member's forward in ONNX Runtime: uint8 [N, C, H, W] torch tensor -> float32 logits torch tensor; with
    `calibration` (uint8 [N, C, H, W]), statically quantized to int8 first."""

    def __init__(self, module: UInt8Logits, key: tuple[int, int], where: str, calibration: np.ndarray | None = None):
        import onnxruntime as ort

        program = export_program(module, key, LOGITS_INPUT, LOGITS_OUTPUT, where)
        model = (program.model_proto.SerializeToString() if calibration is None
                 else quantize_int8(program, calibration))
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = np.ascontiguousarray(images.cpu().numpy())
        return torch.from_numpy(self.session.run([LOGITS_OUTPUT], {LOGITS_INPUT: x})[0])
