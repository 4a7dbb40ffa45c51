"""Shared bits of the benchmarks: the machine description every result is printed with."""

from __future__ import annotations

import os
import platform
import threading
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


class Sampled:
    """Calls `sample()` when the block starts and then every `interval` s in a thread until it ends; the
    results are in `values` (for memory: a page the block touched for a moment shows in some sample)."""

    def __init__(self, sample: Callable[[], Any], interval: float = 0.2):
        self.sample, self.interval = sample, interval
        self.values: list[Any] = []
        self._stop = threading.Event()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.values.append(self.sample())

    def __enter__(self) -> "Sampled":
        self.values.append(self.sample())
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()


def rss_with_children() -> int:
    """RSS of this process and its children (e.g. DataLoader processes), in bytes."""
    import psutil

    me = psutil.Process()
    total = me.memory_info().rss
    for c in me.children(recursive=True):
        try:
            total += c.memory_info().rss
        except psutil.Error:
            pass
    return total
