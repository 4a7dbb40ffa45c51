"""Device-side preprocessing shared by training and inference: uint8 NCHW in, normalized float out.

Batches cross the host->device link as uint8 (4x fewer bytes than float32) and are normalized on the
device with the mean/std that travel in the model file — no inference code retypes them.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch


def stack_hwc(images: Sequence[np.ndarray]) -> torch.Tensor:
    """HWC uint8 arrays of one size -> uint8 NCHW tensor."""
    return torch.from_numpy(np.ascontiguousarray(np.stack(images))).permute(0, 3, 1, 2).contiguous()


def normalize(
    x: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    dtype: torch.dtype = torch.float32,
    channels_last: bool = False,
) -> torch.Tensor:
    """uint8 NCHW (already on the target device) -> (x/255 - mean)/std in `dtype`."""
    c = x.shape[1]
    m = torch.as_tensor(list(mean)[:c], dtype=torch.float32, device=x.device).view(1, c, 1, 1)
    s = torch.as_tensor(list(std)[:c], dtype=torch.float32, device=x.device).view(1, c, 1, 1)
    y = ((x.float() / 255.0) - m) / s
    if channels_last:
        y = y.contiguous(memory_format=torch.channels_last)
    return y.to(dtype)
