"""Shared bits of the benchmarks: the machine description every result is printed with."""

from __future__ import annotations

import os
import platform
import time
from typing import Any, Callable, Sequence

from imgcls_dist.table import format_table


def machine() -> str:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {gpu}, "
            f"torch {torch.__version__}, python {platform.python_version()}")


def items_per_second(fn: Callable[[Any], object], items: Sequence[Any], min_seconds: float) -> float:
    """Calls of `fn` per second over whole passes of `items`, for at least `min_seconds`."""
    n, t0 = 0, time.perf_counter()
    while True:
        for b in items:
            fn(b)
        n += len(items)
        dt = time.perf_counter() - t0
        if dt >= min_seconds:
            return n / dt


def print_table(rows: list[dict], columns: list[str]) -> None:
    print(format_table(columns, [[_fmt(r.get(c)) for c in columns] for r in rows]))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return "" if v is None else str(v)
