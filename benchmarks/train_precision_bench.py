"""`python -m benchmarks train-precision`: one CPU training step (forward, backward, SGD) in fp32 against bf16
autocast (what `train.mixed_precision: bf16` runs on a CPU through accelerate), one thread, random inputs;
samples/s and the ratio per model and input size."""

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


def _samples_per_s(arch: str, size: int, batch: int, bf16: bool, steps: int) -> float:
    torch.manual_seed(0)
    model = get_model(arch, num_classes=10).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, 10, (batch,))
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
        fp32, bf16 = (_samples_per_s(arch, size, batch, b, steps) for b in (False, True))
        rows.append({"model": arch, "px": size, "batch": batch, "fp32 samples/s": round(fp32, 1),
                     "bf16 samples/s": round(bf16, 1), "bf16 / fp32": round(bf16 / fp32, 2)})
    print(f"bench train-precision: {threads} thread(s), native bf16: {native_bf16_features() or 'none'} - {machine()}")
    print_table(rows, list(rows[0]))
    return {"machine": machine(), "rows": rows}
