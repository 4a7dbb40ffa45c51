"""`train.mixed_precision` resolved for a worker's device, and what the training job's first line says of it."""

from __future__ import annotations

import sys

import torch

from imgcls_dist.predictor.precision import PrecisionChoice, choose_precision, cpu_has_native_bf16

# accelerate's name for each precision the CPU rule can give
ACCELERATE = {"bf16": "bf16", "fp32": "no"}


def _cpu_auto() -> PrecisionChoice:
    """Inference's `--precision auto` on this CPU (predictor/precision.py), and why: training follows the same
    rule, bf16 where the CPU computes it natively."""
    return choose_precision("auto", "cpu")


def resolve_mixed_precision(setting: str, cuda: bool) -> str:
    """accelerate's mixed_precision for `train.mixed_precision`. On a CPU, `auto` is bf16 where the CPU computes
    bf16 natively (predictor/precision.py says which; there bf16 autocast with channels_last trained faster than
    fp32 and as accurately: docs/benchmarks.md, "Training steps" and "bf16 training"), else fp32; `bf16` is
    honoured anywhere (emulated, slower, without native support), and `fp16` has no CPU autocast for training,
    so it falls back to fp32 with a warning."""
    if cuda:
        if setting == "auto":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return setting
    if setting == "auto":
        return ACCELERATE[_cpu_auto().precision]
    if setting == "bf16":
        if not cpu_has_native_bf16():
            print("warning: train.mixed_precision=bf16 on a CPU without native bf16 (AVX512-BF16/AMX): emulated, "
                  "slower than fp32", file=sys.stderr, flush=True)
        return "bf16"
    if setting == "fp16":
        print("warning: train.mixed_precision=fp16 has no CPU autocast for training: training in fp32",
              file=sys.stderr, flush=True)
    return "no"


def describe_mixed_precision(setting: str, gpu: bool) -> str:
    """What the training job's first line says of `train.mixed_precision` (the workers resolve it with
    resolve_mixed_precision; on GPUs `auto` depends on the GPU, which the driver may not see)."""
    if setting != "auto":
        return f"mixed precision {setting}"
    if gpu:
        return "mixed precision auto (bf16 where the GPU supports it, else fp16)"
    chosen = _cpu_auto()
    return f"mixed precision {ACCELERATE[chosen.precision]} ({chosen.reason})"
