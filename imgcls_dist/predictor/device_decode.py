"""JPEG rows decoded and resized on the predictor's device; every other row, and any row the device path
fails on, through the CPU path of `predictor/prepare.py` (so such a row gets the CPU path's error string).

`prepare_on_device` is the entry point: nvJPEG on CUDA, torchvision's CPU decoder on device "cpu". `orient`
applies the EXIF orientation (torchvision's CUDA decode does not) and `resize_like_eval` resizes as the eval
transform does. Why, and how it differs from the CPU path: docs/design.md, "Decoding on the predictor's device".
"""

from __future__ import annotations

import io
import warnings
from functools import lru_cache
from typing import NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import ExifTags, Image

from imgcls_dist.data.decode import DEFAULT_MAX_PIXELS, is_jpeg
from imgcls_dist.predictor.prepare import InputKey, prepare_encoded

_LUMA = (0.299, 0.587, 0.114)  # PIL's RGB -> "L" weights (ITU-R 601-2)
ORIENTATION = ExifTags.Base.Orientation  # 0x0112
# Pixels decoded per nvJPEG call. A GPU actor's call holds 512 rows (batch/pipeline.py: batch 128 x 4 micro-batches):
# as 12 MP photos that is 18 GB of RGB at once, more than most GPUs have beside the model. 256 MP is 768 MB of
# RGB: ~21 such photos per call, or all 512 rows of ImageNet-size ones.
DECODE_CHUNK_PIXELS = 256_000_000


class DeviceRow(NamedTuple):
    orientation: int  # EXIF, 1-8; 1 when absent or unreadable (the CPU path then leaves the image as stored too)
    pixels: int  # width * height as stored


def device_row(data: bytes | None, max_pixels: int = DEFAULT_MAX_PIXELS) -> DeviceRow | None:
    """What the device path needs from a row's header, or None when the row may not take it. A row may when it
    is a JPEG whose header passes decode_image's checks, in a colour mode the device decoder handles. Anything
    else (including every broken file) takes the CPU path."""
    if not is_jpeg(data):
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                w, h = img.size
                if not (img.format == "JPEG" and img.mode in ("L", "RGB") and 0 < w * h <= max_pixels):
                    return None
                try:
                    orientation = int(img.getexif().get(ORIENTATION, 1))
                except Exception:
                    orientation = 1
                return DeviceRow(orientation, w * h)
    except Exception:
        return None


def pixel_chunks(pixels: Sequence[int], budget: int) -> list[list[int]]:
    """Consecutive indices of `pixels` grouped so that each group's sum stays within `budget`; a row larger
    than the budget alone is a group of its own."""
    chunks: list[list[int]] = []
    total = 0
    for i, p in enumerate(pixels):
        if not chunks or total + p > budget:
            chunks.append([])
            total = 0
        chunks[-1].append(i)
        total += p
    return chunks


# EXIF orientation -> the tensor op that shows a [C,H,W] image as PIL's ImageOps.exif_transpose does (its table:
# 2 FLIP_LEFT_RIGHT, 3 ROTATE_180, 4 FLIP_TOP_BOTTOM, 5 TRANSPOSE, 6 ROTATE_270, 7 TRANSVERSE, 8 ROTATE_90;
# PIL rotates counter-clockwise, as torch.rot90 does from H towards W). Other values: left as stored, as PIL does.
_ORIENT = {
    2: lambda x: x.flip(-1),
    3: lambda x: x.flip(-2, -1),
    4: lambda x: x.flip(-2),
    5: lambda x: x.transpose(-2, -1),
    6: lambda x: torch.rot90(x, -1, dims=(-2, -1)),
    7: lambda x: x.flip(-2, -1).transpose(-2, -1),
    8: lambda x: torch.rot90(x, 1, dims=(-2, -1)),
}


def orient(rgb: torch.Tensor, orientation: int) -> torch.Tensor:
    """A decoded [C,H,W] image as displayed under its EXIF `orientation` (why here: docs/design.md, "Decoding
    on the predictor's device")."""
    op = _ORIENT.get(orientation)
    return rgb if op is None else op(rgb)


def _decode_all(datas: list[bytes | bytearray | memoryview], device: torch.device) -> list[torch.Tensor | None]:
    """[3,H,W] uint8 per row on `device`, as stored (no EXIF orientation: `orient` does it on every device);
    None where the decoder refused the row. One batched call first; if it fails, row by row, so one bad row
    costs only itself."""
    from torchvision.io import ImageReadMode, decode_jpeg

    if not datas:
        return []
    tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
    try:
        return list(decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device))
    except Exception:
        out: list[torch.Tensor | None] = []
        for t in tensors:
            try:
                out.append(decode_jpeg(t, mode=ImageReadMode.RGB, device=device))
            except Exception:
                out.append(None)
        return out


@lru_cache(maxsize=256)  # a batch of same-size photos reuses one pair of matrices per member size
def _area_weights(n_in: int, n_out: int, device: torch.device) -> torch.Tensor:
    """[n_out, n_in] box-filter weights: output pixel i averages source pixels over [i, i+1) * n_in / n_out,
    partial pixels by their overlap. This is cv2's INTER_AREA for shrinking by any factor; torch's "area"
    mode (adaptive average pooling) equals it only for integer factors (docs/benchmarks.md, "Decoding on the
    predictor's device"), so it is written out here as two small matrix products."""
    edges = torch.arange(n_out + 1, dtype=torch.float64, device=device) * (n_in / n_out)
    src = torch.arange(n_in + 1, dtype=torch.float64, device=device)
    lo = torch.maximum(edges[:-1, None], src[None, :-1])
    hi = torch.minimum(edges[1:, None], src[None, 1:])
    return ((hi - lo).clamp_(min=0) * (n_out / n_in)).float()


def resize_like_eval(rgb: torch.Tensor, size: int, channels: int) -> torch.Tensor:
    """[3,H,W] uint8 -> [channels,size,size] uint8, as the eval transform resizes (docs/design.md, "Decoding on
    the predictor's device")."""
    x = rgb.float()
    h, w = rgb.shape[1:]
    if h >= size and w >= size:  # shrinking (or same size): the area average, exactly
        if (h, w) != (size, size):
            x = _area_weights(h, size, x.device) @ x @ _area_weights(w, size, x.device).T
    else:
        x = F.interpolate(x[None], size=(size, size), mode="bilinear", align_corners=False)[0]
    if channels == 1:
        x = sum(c * x[i : i + 1] for i, c in enumerate(_LUMA))
    return x.round_().clamp_(0, 255).to(torch.uint8)


def prepare_on_device(images: Sequence[bytes | None], keys: Sequence[InputKey], device: torch.device | str,
                      max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[dict[InputKey, torch.Tensor], list[str | None]]:
    """Encoded images -> ({key: [N,C,size,size] uint8 on `device`}, per-row error or None). Never raises for a
    row: what the device cannot decode goes through `prepare_encoded` (CPU), whose error string it keeps."""
    device = torch.device(device)
    n = len(images)
    out = {k: torch.zeros((n, k[1], k[0], k[0]), dtype=torch.uint8, device=device) for k in keys}
    errors: list[str | None] = [None] * n
    headers = {i: device_row(data, max_pixels) for i, data in enumerate(images)}
    rows = [i for i, h in headers.items() if h is not None]
    done = set()
    for chunk in pixel_chunks([headers[i].pixels for i in rows], DECODE_CHUNK_PIXELS):
        chunk_rows = [rows[j] for j in chunk]
        for i, rgb in zip(chunk_rows, _decode_all([images[i] for i in chunk_rows], device)):
            if rgb is None:
                continue
            rgb = orient(rgb, headers[i].orientation)
            for size, channels in keys:
                out[(size, channels)][i] = resize_like_eval(rgb, size, channels)
            done.add(i)
    cpu_rows = [i for i in range(n) if i not in done]
    if cpu_rows:
        arrays, cpu_errors = prepare_encoded([images[i] for i in cpu_rows], keys, max_pixels)
        idx = torch.as_tensor(cpu_rows, device=device)
        for k, arr in arrays.items():  # zeros where the CPU path failed too, as prepare_encoded leaves them
            out[k][idx] = torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2).to(device)
        for i, err in zip(cpu_rows, cpu_errors):
            errors[i] = err
    return out, errors
