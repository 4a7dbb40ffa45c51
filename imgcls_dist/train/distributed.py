"""Gathering epoch totals across workers (the per-step agreement is train/preempt.py's `Notices.agree`)."""

from __future__ import annotations

from typing import Any

import torch


def all_gather_list(obj: Any, world: int) -> list[Any]:
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    torch.distributed.all_gather_object(out, obj)
    return out
