"""`train.mixed_precision` resolved for a worker's device, and what the training job's first line says of it."""

from __future__ import annotations

import sys

import torch

from imgcls_dist.predictor.precision import cpu_has_native_bf16, native_bf16_features


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
        return "bf16" if cpu_has_native_bf16() else "no"
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
    if gpu:
        return f"mixed precision {setting}" + (" (bf16 where the GPU supports it, else fp16)" if setting == "auto" else "")
    if setting != "auto":
        return f"mixed precision {setting}"
    native = native_bf16_features()
    return (f"mixed precision bf16 (auto: CPU has {' and '.join(native)})" if native else
            "mixed precision no (auto: CPU without native bf16)")
