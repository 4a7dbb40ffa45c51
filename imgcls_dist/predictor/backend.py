"""`--backend` (predict, infer, serve): what runs a member's forward, resolved with the precision for a device.

torch: eager PyTorch in the resolved precision (predictor/precision.py). onnxruntime: ONNX Runtime's CPU
execution provider in fp32, or int8 (statically quantized, `--precision int8`: only onnxruntime runs it;
predictor/onnx_runtime.py); bf16 has no fast kernels there.
auto: onnxruntime where `--precision auto` resolves to fp32 on a CPU (one without native bf16) and the runtime is
installed, torch everywhere else: on a CPU with native bf16, torch's bf16 forward was the fastest choice measured,
and in fp32 ONNX Runtime's forward was faster than torch's (docs/benchmarks.md, "CPU backends"). An explicit
`--precision fp32` keeps torch under auto: it asks for torch's fp32, the reference the other choices are
measured against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from imgcls_dist.data.schema import split_files
from imgcls_dist.errors import UserError
from imgcls_dist.storage import PathLike
from imgcls_dist.predictor.onnx_runtime import missing_runtime_modules, require_runtime
from imgcls_dist.predictor.options import BACKENDS
from imgcls_dist.predictor.precision import PrecisionChoice, choose_precision


@dataclass(frozen=True)
class BackendChoice:
    backend: str  # "torch" or "onnxruntime"
    reason: str

    def __str__(self) -> str:
        return f"backend {self.backend} ({self.reason})"


def check_backend(setting: str) -> str:
    if setting not in BACKENDS:
        raise UserError(f"--backend: must be one of {', '.join(BACKENDS)}, got {setting!r}")
    return setting


def check_calibration(precision: str, calibration: PathLike | None) -> None:
    """int8 (resolved) needs a calibration dataset with a validation split; the other precisions take none."""
    if precision == "int8" and calibration is None:
        raise UserError("--precision int8 needs --calibration DATASET (its validation images calibrate the "
                        "quantization)")
    if precision != "int8" and calibration is not None:
        raise UserError(f"--calibration {calibration}: only --precision int8 is calibrated")
    if calibration is not None:
        split_files(calibration, "val")  # a dataset without one: one line naming it, before any model is built


def backend_for(setting: str, precision_setting: str, precision: PrecisionChoice, device: torch.device,
                runtime_installed: bool) -> BackendChoice:
    """The backend rule (module docstring) for a resolved precision; pure, so every branch is testable on any CPU."""
    if setting == "torch":
        return BackendChoice("torch", "given")
    if setting == "onnxruntime":
        return BackendChoice("onnxruntime", "given")
    if device.type != "cpu":
        return BackendChoice("torch", f"auto: {device.type} device")
    if precision_setting != "auto" or precision.precision != "fp32":
        why = "given" if precision_setting != "auto" else "on this CPU"
        return BackendChoice("torch", f"auto: {precision.precision} {why}")
    if not runtime_installed:
        return BackendChoice("torch", "auto: fp32 on this CPU, onnxruntime not installed")
    return BackendChoice("onnxruntime", "auto: fp32 on this CPU, where onnxruntime is faster")


def choose_runtime(backend: str, precision: str, device: str | torch.device) -> tuple[BackendChoice, PrecisionChoice]:
    """(--backend, --precision) for a device -> what runs the forward, in which precision, and why."""
    check_backend(backend)
    device = torch.device(device)
    if precision == "int8":
        if backend == "torch":
            raise UserError("--precision int8: runs in ONNX Runtime; use --backend onnxruntime (or auto)")
        if device.type != "cpu":
            raise UserError(f"--precision int8: runs on the CPU only, not on {device.type}")
        require_runtime("--precision int8")
        reason = "given" if backend == "onnxruntime" else "auto: int8 runs in onnxruntime"
        return BackendChoice("onnxruntime", reason), PrecisionChoice("int8", "given")
    if backend == "onnxruntime":
        if device.type != "cpu":
            raise UserError(f"--backend onnxruntime: runs on the CPU only, not on {device.type}; use --backend torch")
        if precision not in ("auto", "fp32"):
            raise UserError(f"--backend onnxruntime: runs fp32 or int8, not {precision}; use --backend torch for "
                            f"{precision}")
        require_runtime("--backend onnxruntime")
        chosen = PrecisionChoice("fp32", "the onnxruntime backend runs fp32" if precision == "auto" else "given")
        return BackendChoice("onnxruntime", "given"), chosen
    chosen = choose_precision(precision, device)
    return backend_for(backend, precision, chosen, device, not missing_runtime_modules()), chosen
