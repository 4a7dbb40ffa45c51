"""DeviceFeed: a predictor call's micro-batches on its device; pinned, double-buffered copies on CUDA."""

from __future__ import annotations

import pytest
import torch

from imgcls_dist.predictor.device_feed import DeviceFeed


def _nhwc_batches(n: int) -> dict:
    g = torch.Generator().manual_seed(0)
    # Decoded rows arrive NHWC and are viewed as NCHW (predictor.predictor._as_nchw): not contiguous.
    return {(16, 3): torch.randint(0, 256, (n, 16, 16, 3), dtype=torch.uint8, generator=g).permute(0, 3, 1, 2),
            (8, 1): torch.randint(0, 256, (n, 1, 8, 8), dtype=torch.uint8, generator=g)}


def _check_feed(device: torch.device, calls: int = 2) -> DeviceFeed:
    feed = DeviceFeed(device, batch_size=4)
    for n in (11, 3)[:calls]:
        batches = _nhwc_batches(n)
        seen = []
        for sl, xs in feed(batches, n):
            seen.append((sl.start, sl.stop))
            for key, x in xs.items():
                assert x.device.type == device.type and x.shape[0] == sl.stop - sl.start
                assert torch.equal(x.cpu(), batches[key][sl])
        assert seen == [(s, min(n, s + 4)) for s in range(0, n, 4)]
    return feed


def test_cpu_feed_hands_over_every_row_in_order():
    feed = _check_feed(torch.device("cpu"))
    assert not feed._pinned  # no pinned staging without CUDA


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (pinned memory, copy stream)")
def test_cuda_feed_copies_every_row_through_two_pinned_buffers_per_key():
    feed = _check_feed(torch.device("cuda"))
    assert len(feed._pinned) == 4 and all(b.is_pinned() for b in feed._pinned.values())
    on_device = {k: v.cuda() for k, v in _nhwc_batches(5).items()}
    assert [sl.stop for sl, _ in feed(on_device, 5)] == [4, 5]  # device-resident input: no staging
