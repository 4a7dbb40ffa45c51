"""`python -m benchmarks train-precision`: one CPU training step (forward, backward, SGD) in fp32 against bf16
autocast (what `train.mixed_precision: bf16` runs on a CPU through accelerate), in the NCHW layout and with the
model and inputs channels_last, one thread, random inputs; samples/s and the ratios per model and input size."""

from __future__ import annotations

import time
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.common import machine, print_table
from imgcls_dist.models.registry import get_model
from imgcls_dist.predictor.precision import native_bf16_features

CASES = (("lenet5", 32, 64), ("resnet18", 32, 64), ("resnet18", 224, 16))


# arm -> (bf16, channels_last)
ARMS = {"fp32": (False, False), "bf16": (True, False), "bf16 channels_last": (True, True)}


def _samples_per_s(arch: str, size: int, batch: int, bf16: bool, channels_last: bool, steps: int) -> float:
    torch.manual_seed(0)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    model = get_model(arch, num_classes=10).train().to(memory_format=layout)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.randn(batch, 3, size, size).contiguous(memory_format=layout), torch.randint(0, 10, (batch,))
    amp = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext()
    for i in range(steps + 2):  # two warm-up steps
        if i == 2:
            t0 = time.perf_counter()
        with amp:
            loss = F.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return steps * batch / (time.perf_counter() - t0)


def bench_train_precision(steps: int = 8, threads: int = 1) -> dict[str, Any]:
    torch.set_num_threads(threads)
    rows = []
    for arch, size, batch in CASES:
        rates = {arm: _samples_per_s(arch, size, batch, *spec, steps) for arm, spec in ARMS.items()}
        rows.append({"model": arch, "px": size, "batch": batch, "fp32 samples/s": round(rates["fp32"], 1),
                     **{f"{arm} / fp32": round(r / rates["fp32"], 2) for arm, r in rates.items() if arm != "fp32"}})
    print(f"bench train-precision: {threads} thread(s), native bf16: {native_bf16_features() or 'none'} - {machine()}")
    print_table(rows, list(rows[0]))
    return {"machine": machine(), "rows": rows}
