"""The two collectives the loop needs beyond DDP's own: agreeing on a step, and gathering epoch totals."""

from __future__ import annotations

from typing import Any

import torch


def all_agree(flag_bad: bool, device: torch.device, world: int) -> bool:
    """True when no worker saw a bad step; every worker must take the same branch or DDP deadlocks."""
    if world == 1:
        return not flag_bad
    t = torch.tensor([1.0 if flag_bad else 0.0], device=device)
    torch.distributed.all_reduce(t)
    return t.item() == 0


def all_gather_list(obj: Any, world: int) -> list[Any]:
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    torch.distributed.all_gather_object(out, obj)
    return out
