"""Stopping and checkpointing on notice inside the training loop.

Two notices reach a Train worker: the driver's stop request (SIGTERM to `imgcls-dist train`, relayed by
imgcls_dist/preemption.py) and Ray Train's node-drain notice (`ray.train.get_preemption_info`, on a cluster
whose autoscaler or operator drains a node before taking it away). Every rank must act at the same step, or
DDP's next all-reduce hangs, so what each rank saw travels in the one all-reduce a step already makes (the
finite-loss check): a stop request seen by any rank stops all of them after the same batch, and rank 0's clock
says when every rank asks Ray about drains (that call is a barrier through Train's controller: too slow for
every step).

On a stop request the loop writes a mid-epoch checkpoint at the next optimizer step and returns; on a drain
notice it writes one and keeps training, as Ray Train recommends: when the node goes, Train restarts the group
from that checkpoint (`FailureConfig.max_preemption_failures`, unlimited by default).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from imgcls_dist.preemption import StopPoller

DRAIN_CHECK_EVERY_S = 5.0  # Ray's drain deadlines are tens of seconds at the least (cloud spot notices: 30-120 s)


@dataclass
class StepSignals:
    ok: bool  # no worker saw a non-finite loss (or an empty batch)
    stop: bool  # some worker saw the driver's stop request
    check_drain: bool  # every worker asks Ray about node drains after this step


@dataclass
class Notices:
    """One worker's view of both notices."""

    poller: StopPoller
    watch_drains: bool = False
    rank: int = 0
    stop_seen: bool = False  # agreed by every rank at some step of this run
    drain_checkpointed: bool = False
    _last_drain_check: float = field(default_factory=time.monotonic)

    def _drain_due(self) -> bool:
        if not self.watch_drains or self.drain_checkpointed or self.rank != 0:
            return False
        if time.monotonic() - self._last_drain_check < DRAIN_CHECK_EVERY_S:
            return False
        self._last_drain_check = time.monotonic()
        return True

    def agree(self, bad: bool, device: torch.device, world: int) -> StepSignals:
        """The step's collective: (bad, stop request seen, drain check due) summed over the ranks."""
        local = [float(bad), float(self.poller.poll() is not None), float(self._drain_due())]
        if world > 1:
            t = torch.tensor(local, device=device)
            torch.distributed.all_reduce(t)
            local = t.tolist()
        signals = StepSignals(ok=local[0] == 0, stop=local[1] > 0, check_drain=local[2] > 0)
        self.stop_seen = self.stop_seen or signals.stop
        return signals

    def drain_notice(self) -> Any:
        """Ray Train's preemption info once a node of this group is being drained (every rank calls this at
        the same step), None before; a notice is acted on once."""
        import ray.train

        info = ray.train.get_preemption_info()
        if info is not None:
            self.drain_checkpointed = True
        return info


def build_notices(loop_config: dict, rank: int) -> Notices:
    return Notices(poller=StopPoller(loop_config.get("stop_flag")), watch_drains=bool(loop_config.get("watch_drains")),
                   rank=rank)
