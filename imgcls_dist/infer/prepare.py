"""Encoded bytes -> the uint8 inputs each ensemble member needs, exactly as training prepared them.

An input key is (image_size, channels). Training decodes with `decode_image(channels=in_channels)` and
resizes with `build_eval_transform(image_size)`; here each row is decoded once to RGB and, for
1-channel members, converted with PIL's "L" — which is what decode_image(channels=1) does after its own
RGB step, so both give identical pixels (tests/test_infer_predictor.py checks it).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Iterable, Iterator, Sequence

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from imgcls_dist.data.augment import apply, build_eval_transform
from imgcls_dist.data.decode import DEFAULT_MAX_PIXELS, decode_image
from imgcls_dist.data.schema import IMAGE, LABEL
from imgcls_dist.storage import PathLike, location

InputKey = tuple[int, int]  # (image_size, channels)


@lru_cache(maxsize=None)
def _transform(size: int):
    return build_eval_transform(size)


def to_channels(rgb: np.ndarray, channels: int) -> np.ndarray:
    if channels == 3:
        return rgb
    return np.asarray(Image.fromarray(rgb, mode="RGB").convert("L"), dtype=np.uint8)[:, :, None]


def resize_for(rgb: np.ndarray, keys: Iterable[InputKey]) -> dict[InputKey, np.ndarray]:
    """One decoded RGB image -> {key: HxWxC uint8} for every member input key."""
    out = {}
    for size, channels in keys:
        out[(size, channels)] = apply(_transform(size), to_channels(rgb, channels))
    return out


def prepare_encoded(
    images: Sequence[bytes | None], keys: Sequence[InputKey], max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[dict[InputKey, np.ndarray], list[str | None]]:
    """Encoded images -> ({key: [N,H,W,C] uint8}, per-row error or None). Never raises per row: a row
    that cannot be decoded or resized gets zeros and its reason, so one bad image costs one row."""
    n = len(images)
    arrays = {k: np.zeros((n, k[0], k[0], k[1]), np.uint8) for k in keys}
    errors: list[str | None] = [None] * n
    for i, data in enumerate(images):
        rgb, err = decode_image(data, channels=3, max_pixels=max_pixels)
        if err is None:
            try:
                for k, arr in resize_for(rgb, keys).items():
                    arrays[k][i] = arr
            except Exception as exc:  # a resize failure is still one row's problem
                err = " ".join(f"preprocess failed: {type(exc).__name__}: {exc}".split())[:200]
        errors[i] = err
    return arrays, errors


def labelled_batches(files: Sequence[PathLike], keys: Sequence[InputKey], batch_size: int = 256,
                     max_rows: int | None = None) -> Iterator[tuple[np.ndarray, dict[InputKey, np.ndarray]]]:
    """(labels, {key: [N,H,W,C] uint8}) batches of labelled shards, streamed (memory does not grow with
    the split); undecodable or unlabelled rows get label -1. At most `max_rows` rows."""
    seen = 0
    for uri in files:
        f = location(uri)
        pf = pq.ParquetFile(f.path, filesystem=f.fs)
        for batch in pf.iter_batches(batch_size=batch_size, columns=[IMAGE, LABEL]):
            if max_rows is not None:
                if seen >= max_rows:
                    return
                batch = batch.slice(0, max_rows - seen)
            seen += batch.num_rows
            arrays, errors = prepare_encoded(batch.column(IMAGE).to_pylist(), keys)
            y = np.array([-1 if v is None else v for v in batch.column(LABEL).to_pylist()], dtype=np.int64)
            y[np.array([e is not None for e in errors], dtype=bool)] = -1
            yield y, arrays
