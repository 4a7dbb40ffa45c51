"""The micro-batches of one predictor call, on the predictor's device.

On CUDA, each micro-batch's uint8 pixels are copied into a pinned host buffer and sent to the GPU with a
non-blocking copy on a side stream, issued before the previous micro-batch's forward is waited on, so the
H2D copy of batch i+1 overlaps the compute of batch i (two pinned buffers per input key, reused across
calls: pinning memory costs far more than copying into it). Everywhere else (CPU, or inputs already on the
device, as `--decode device` makes them) the slices are handed over as they are.

Why by hand: the batches arrive in a Ray Data `map_batches` actor call, not from a torch DataLoader, so
DataLoader's `pin_memory` thread does not apply, and Ray Data's device prefetch belongs to
`iter_torch_batches`, which a map_batches UDF does not go through.
"""

from __future__ import annotations

from typing import Hashable, Iterator

import torch

SLOTS = 2  # double buffering: one micro-batch copying while the one before it computes


class DeviceFeed:
    def __init__(self, device: torch.device, batch_size: int):
        self.device = device
        self.batch_size = batch_size
        self.cuda = device.type == "cuda"
        self._stream = torch.cuda.Stream(device) if self.cuda else None
        self._pinned: dict[tuple[Hashable, int], torch.Tensor] = {}
        self._copied: dict[tuple[Hashable, int], torch.cuda.Event] = {}

    def __call__(self, tensors: dict[Hashable, torch.Tensor], n: int
                 ) -> Iterator[tuple[slice, dict[Hashable, torch.Tensor]]]:
        """(rows, {key: that micro-batch on the device}) for consecutive micro-batches of n rows."""
        slices = [slice(s, min(n, s + self.batch_size)) for s in range(0, n, self.batch_size)]
        if not self.cuda:
            for sl in slices:
                yield sl, {k: v[sl].to(self.device) for k, v in tensors.items()}
            return
        pending = None
        for i, sl in enumerate(slices):
            issued = (sl, *self._upload(tensors, sl, i % SLOTS))
            if pending is not None:
                yield self._ready(*pending)
            pending = issued
        if pending is not None:
            yield self._ready(*pending)

    def _upload(self, tensors: dict[Hashable, torch.Tensor], sl: slice, slot: int
                ) -> tuple[dict[Hashable, torch.Tensor], list[torch.cuda.Event]]:
        out, events = {}, []
        rows = sl.stop - sl.start
        for key, v in tensors.items():
            if v.device.type == "cuda":
                out[key] = v[sl]
                continue
            buf = self._buffer(key, slot, v)
            done = self._copied.get((key, slot))
            if done is not None:
                done.synchronize()  # the copy that last read this buffer has finished
            buf[:rows].copy_(v[sl])  # also makes NHWC-decoded input contiguous NCHW
            with torch.cuda.stream(self._stream):
                out[key] = buf[:rows].to(self.device, non_blocking=True)
                event = torch.cuda.Event()
                event.record(self._stream)
            self._copied[(key, slot)] = event
            events.append(event)
        return out, events

    def _buffer(self, key: Hashable, slot: int, like: torch.Tensor) -> torch.Tensor:
        shape = (self.batch_size, *like.shape[1:])
        buf = self._pinned.get((key, slot))
        if buf is None or buf.shape != shape or buf.dtype != like.dtype:
            buf = self._pinned[(key, slot)] = torch.empty(shape, dtype=like.dtype, pin_memory=True)
        return buf

    def _ready(self, sl: slice, batch: dict[Hashable, torch.Tensor], events: list[torch.cuda.Event]
               ) -> tuple[slice, dict[Hashable, torch.Tensor]]:
        compute = torch.cuda.current_stream(self.device)
        for event in events:  # this micro-batch's copies only, not the next one's, already queued behind them
            compute.wait_event(event)
        for x in batch.values():
            x.record_stream(compute)  # allocated on the copy stream, used on the compute stream
        return sl, batch
