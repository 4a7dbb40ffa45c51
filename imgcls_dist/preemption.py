"""A graceful stop: SIGTERM (Kubernetes deleting a pod, `ray job stop`, a spot notice relayed as SIGTERM) asks
a running job to stop at its next safe point, write what it has and exit within a grace period.

The signal reaches the driver only (docs/design.md, "Preemption"), while the work runs in Ray actors and tasks
on other nodes, so the driver's handler sets a flag in a small actor (`StopFlag`) that the workers read:
training workers between steps (`StopPoller`, never blocking a step), the bulk job's read tasks and predictor
actors before each unit of work (`stop_requested`). Python's signal module and a Ray actor are all it takes;
neither Ray Train nor Ray Data has a driver-side stop that keeps the work done so far (Ray Train's own
preemption signal covers node drains, which train/preempt.py also reads).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from contextlib import contextmanager
from typing import Any, Iterator

# Kubernetes gives a pod 30 s between SIGTERM and SIGKILL by default; 25 s leaves the process time to exit.
DEFAULT_GRACE_S = 25.0
# A worker asks the flag at most this often (a step never waits for the answer).
POLL_INTERVAL_S = 0.5


class StopFlag:
    """The driver's stop request, readable from every node (run as a Ray actor with no CPU)."""

    def __init__(self) -> None:
        self._reason: str | None = None

    def set(self, reason: str) -> None:
        self._reason = self._reason or reason

    def get(self) -> str | None:
        return self._reason


def new_flag() -> Any:
    """The flag actor, on the driver's own node: the flag lives as long as the driver that sets it, and no
    other node's loss takes it away from the workers that read it."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return ray.remote(num_cpus=0)(StopFlag).options(scheduling_strategy=here).remote()


def _read(ref: Any) -> str | None:
    """A flag's value; None when the flag is gone (its driver, and so any stop it could ask for, is gone)."""
    import ray

    try:
        return ray.get(ref)
    except ray.exceptions.RayActorError:
        return None


def stop_requested(flag: Any) -> str | None:
    """The reason the job was asked to stop, or None (a blocking read: for work units far longer than it)."""
    return None if flag is None else _read(flag.get.remote())


class StopPoller:
    """A training worker's view of the flag: at most one read in flight, looked at without waiting, so the
    answer arrives a step or two after the signal and no step is slowed by it."""

    def __init__(self, flag: Any, interval_s: float = POLL_INTERVAL_S) -> None:
        self.flag, self.interval_s = flag, interval_s
        self.reason: str | None = None
        self._ref = None
        self._last = 0.0

    def poll(self) -> str | None:
        import ray

        if self.flag is None or self.reason is not None:
            return self.reason
        if self._ref is not None:
            ready, _ = ray.wait([self._ref], timeout=0)
            if ready:
                self.reason, self._ref = _read(self._ref), None
        elif time.monotonic() - self._last >= self.interval_s:
            self._ref, self._last = self.flag.get.remote(), time.monotonic()
        return self.reason


class StopRequest:
    """Driver side: the flag, the SIGTERM handler that sets it, and the grace timer that ends the process if
    the safe point is not reached in time (a second SIGTERM ends it at once)."""

    def __init__(self, what: str, grace_s: float) -> None:
        self.what, self.grace_s = what, grace_s
        self.flag = new_flag()
        self.reason: str | None = None
        self._timer: threading.Timer | None = None

    def request(self, reason: str) -> None:
        """Ask the workers to stop (what the signal handler does; callable directly)."""
        self.reason = self.reason or reason
        self.flag.set.remote(self.reason)

    def _on_signal(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.reason is not None:
            print(f"{self.what}: second {name}, exiting now", file=sys.stderr, flush=True)
            os._exit(128 + signum)
        print(f"{self.what}: {name} received: stopping at the next safe point and writing what is done "
              f"(grace {self.grace_s:g} s)", file=sys.stderr, flush=True)
        self.request(name)
        self._timer = threading.Timer(self.grace_s, self._expire, args=(signum,))
        self._timer.daemon = True
        self._timer.start()

    def _expire(self, signum: int) -> None:
        print(f"{self.what}: the grace of {self.grace_s:g} s ran out before the safe point; exiting now "
              "(the next run resumes from the last checkpoint or part written)", file=sys.stderr, flush=True)
        os._exit(128 + signum)


@contextmanager
def stop_on_sigterm(what: str, grace_s: float = DEFAULT_GRACE_S) -> Iterator[StopRequest]:
    """SIGTERM -> a StopRequest while the block runs; the grace bounds the time to the block's end (the safe
    point). Signal handlers belong to the main thread: elsewhere (a Tune trial's thread) the flag is still
    created, and nothing but `request` sets it."""
    import ray

    req = StopRequest(what, grace_s)
    main = threading.current_thread() is threading.main_thread()
    old = signal.signal(signal.SIGTERM, req._on_signal) if main else None
    try:
        yield req
    finally:
        if main:
            signal.signal(signal.SIGTERM, old)
        if req._timer is not None:
            req._timer.cancel()
        ray.kill(req.flag)
