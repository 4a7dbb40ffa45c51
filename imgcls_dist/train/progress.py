"""Progress inside long epochs (rank 0): a line every `train.progress_every_s` seconds, per-step loss and LR
in TensorBoard. Ray forwards a worker's stdout line by line, so a live bar would arrive as a flood of lines;
the periodic line is what a terminal and a log file both read well."""

from __future__ import annotations

import time


def _duration(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class EpochProgress:
    def __init__(self, *, epoch: int, epochs: int, steps: int, first_step: int, world: int, every_s: float,
                 tensorboard=None, enabled: bool = True):
        self.epoch, self.epochs, self.steps, self.world = epoch, epochs, steps, world
        self.every_s, self.tb, self.enabled = every_s, tensorboard, enabled
        self.first_step = first_step
        self.global_base = epoch * steps  # TensorBoard's step axis: optimizer steps since the run began
        self.t0 = self.last = time.perf_counter()
        self.samples = 0

    def step(self, done: int, samples: int, loss: float | None, lr: float) -> None:
        """After batch `done` (1-based count within the epoch) of `samples` rows on this rank."""
        if not self.enabled:
            return
        self.samples += samples
        if self.tb is not None and loss is not None:
            self.tb.scalars({"step/loss": loss, "step/lr": lr}, self.global_base + done)
        now = time.perf_counter()
        if now - self.last < self.every_s or done >= self.steps:
            return
        self.last = now
        rate = self.samples * self.world / max(now - self.t0, 1e-9)  # all ranks move together
        left = (self.steps - done) / max(done - self.first_step, 1) * (now - self.t0)
        print(f"epoch {self.epoch + 1}/{self.epochs}  step {done}/{self.steps}  {rate:.0f} samples/s  "
              f"ETA {_duration(left)} (epoch)", flush=True)
