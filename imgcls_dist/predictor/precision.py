"""`--precision` (predict, infer, serve, ensemble build): the dtype the predictor's forward runs in, resolved for
its device.

fp32: no autocast. bf16: `torch.autocast` to bfloat16, models and inputs channels_last (fp32's exponent range:
logits cannot overflow; softmax, temperatures and combining stay fp32). fp16: autocast to float16, for CUDA
devices without bf16 only.
auto: on CUDA, bf16 where the device supports it, else fp16; on a CPU, bf16 only where the CPU computes bf16
natively, else fp32 (measured: docs/benchmarks.md, "CPU precision").
"""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from imgcls_dist.errors import UserError
from imgcls_dist.predictor.options import HANDED_ON_PRECISIONS, PRECISIONS, Precision

__all__ = ["Precision", "PrecisionChoice", "check_precision", "choose_precision", "cpu_has_native_bf16",
           "resolve_precision", "use_channels_last"]

# cpuinfo flag -> the name printed. Either runs bf16 dot products in hardware (VDPBF16PS, AMX tiles); without
# them oneDNN emulates bf16 with fp32 arithmetic plus conversions.
NATIVE_BF16 = {"avx512_bf16": "AVX512-BF16", "amx_bf16": "AMX-BF16"}
AMP_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16, "int8": None}


@dataclass(frozen=True)
class PrecisionChoice:
    precision: str  # "fp32", "bf16", "fp16" or "int8"
    reason: str  # why, as the job's first line prints it: "auto: CPU has AVX512-BF16"

    @property
    def amp_dtype(self) -> torch.dtype | None:
        return AMP_DTYPES[self.precision]

    def __str__(self) -> str:
        return f"precision {self.precision} ({self.reason})"


@functools.cache
def _proc_cpuinfo_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return frozenset(line.partition(":")[2].split())


def native_bf16_features() -> list[str]:
    """This CPU's bf16 instruction sets, by their printed names (NATIVE_BF16): torch's own view of the CPU
    (`torch.cpu.get_capabilities`, cpuinfo, what its kernels dispatch on) where this torch has it, else the
    kernel's flags in /proc/cpuinfo."""
    capabilities = getattr(torch.cpu, "get_capabilities", None)
    found = capabilities() if capabilities is not None else dict.fromkeys(_proc_cpuinfo_flags(), True)
    return [name for flag, name in NATIVE_BF16.items() if found.get(flag)]


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware: the `avx512_bf16` or `amx_bf16` flag of /proc/cpuinfo.

    Not `torch.ops.mkldnn._is_mkldnn_bf16_supported()`: that says oneDNN runs bf16 at all, which it also does
    on AVX-512 CPUs without these instructions, by emulation."""
    return bool(native_bf16_features())


@functools.cache
def _warn_once(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def _on_cpu(setting: str) -> PrecisionChoice:
    native = native_bf16_features()
    if setting == "auto":
        if native:
            return PrecisionChoice("bf16", f"auto: CPU has {' and '.join(native)}")
        return PrecisionChoice("fp32", f"auto: CPU lacks {' and '.join(NATIVE_BF16.values())}")
    if setting == "fp16":  # a CUDA-only choice (what auto gives GPUs without bf16), never offered on the CLI
        raise UserError("precision fp16: CUDA devices only; use fp32 or bf16")
    if setting == "bf16" and not native:
        _warn_once(f"precision bf16 on a CPU without {' or '.join(NATIVE_BF16.values())}: emulated, slower than "
                   "fp32 (--precision auto picks fp32 here)")
    return PrecisionChoice(setting, "given")


def _on_cuda(setting: str) -> PrecisionChoice:
    if setting != "auto":
        return PrecisionChoice(setting, "given")
    if not torch.cuda.is_available():
        # A batch job's driver planning GPU actors on a machine without one: torch reports bf16 for Ampere and
        # later GPUs (and, with emulation, for most older ones), so the actors' own answer would almost always
        # be bf16.
        return PrecisionChoice("bf16", "auto: CUDA actors, bf16 assumed (no GPU visible here)")
    if torch.cuda.is_bf16_supported():
        return PrecisionChoice("bf16", "auto: CUDA device supports bf16")
    return PrecisionChoice("fp16", "auto: CUDA device lacks bf16")


def check_precision(setting: str) -> str:
    """One of PRECISIONS, or "fp16" (a resolved CUDA choice handed on: HANDED_ON_PRECISIONS)."""
    if setting not in HANDED_ON_PRECISIONS:
        raise UserError(f"--precision: must be one of {', '.join(PRECISIONS)}, got {setting!r}")
    return setting


def choose_precision(setting: str, device: str | torch.device) -> PrecisionChoice:
    """`--precision` for a device -> what the forward runs in, and why (`check_precision` says which settings
    there are)."""
    check_precision(setting)
    kind = torch.device(device).type
    if kind == "cuda":
        return _on_cuda(setting)
    if kind == "cpu":
        return _on_cpu(setting)
    # Other backends (mps, xpu) keep fp32 unless told: their autocast support is not measured here.
    return PrecisionChoice("fp32", f"auto: {kind} device") if setting == "auto" else PrecisionChoice(setting, "given")


def resolve_precision(setting: str, device: str | torch.device) -> str:
    """"fp32", "bf16" or "fp16": `choose_precision` without the reason."""
    return choose_precision(setting, device).precision


def use_channels_last(precision: str, device: str | torch.device) -> bool:
    """Models and inputs in channels_last (NHWC)? On CUDA always (cuDNN's tensor-core convolutions are NHWC). On
    a CPU with bf16 only: there it was as fast or faster than NCHW, in fp32 neither faster nor slower, so fp32
    keeps the layout the model file has (docs/benchmarks.md, "CPU precision")."""
    kind = torch.device(device).type
    return kind == "cuda" or (kind == "cpu" and precision == "bf16")
