"""Encoded bytes -> the uint8 inputs each ensemble member needs, exactly as training prepared them.

`prepare_encoded` decodes a batch of rows (once per distinct member input size where the decode depends on
it), `labelled_batches` reads labelled shards as such inputs. Why the pixels match training's:
docs/design.md, "Preparing member inputs".
"""

from __future__ import annotations

from functools import lru_cache
from typing import Iterable, Iterator, Sequence

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from imgcls_dist.data.augment import apply, build_eval_transform
from imgcls_dist.data.decode import DEFAULT_MAX_PIXELS, DecodeResult, decode_image, is_jpeg, read_image_file
from imgcls_dist.data.schema import IMAGE, LABEL, split_files
from imgcls_dist.errors import UserError
from imgcls_dist.storage import PathLike, location

InputKey = tuple[int, int]  # (image_size, channels)


@lru_cache(maxsize=None)
def eval_transform(size: int):
    """build_eval_transform(size), built once per process (building one costs a fair part of what resizing an
    image costs: docs/benchmarks.md, "Reduced-size JPEG decode")."""
    return build_eval_transform(size)


def to_channels(rgb: np.ndarray, channels: int) -> np.ndarray:
    if channels == 3:
        return rgb
    return np.asarray(Image.fromarray(rgb, mode="RGB").convert("L"), dtype=np.uint8)[:, :, None]


def _decode_per_size(data: bytes | None, sizes: Iterable[int], max_pixels: int) -> dict[int, DecodeResult]:
    """{image_size: RGB decode at that size}; one decode serves every size unless the bytes are a JPEG."""
    sizes = sorted(set(sizes), reverse=True)
    first = decode_image(data, channels=3, max_pixels=max_pixels, min_size=sizes[0])
    if first.error is not None or len(sizes) == 1 or not is_jpeg(data):
        return dict.fromkeys(sizes, first)
    return {sizes[0]: first, **{s: decode_image(data, channels=3, max_pixels=max_pixels, min_size=s)
                                for s in sizes[1:]}}


def prepare_image(data: bytes | None, keys: Sequence[InputKey],
                  max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[dict[InputKey, np.ndarray] | None, str | None]:
    """One encoded image -> ({key: HxWxC uint8} for every member input key, None), or (None, reason).
    Never raises: a resize failure is still one row's problem."""
    decoded = _decode_per_size(data, (size for size, _ in keys), max_pixels)
    out = {}
    for size, channels in keys:
        rgb, err = decoded[size]
        if err is not None:
            return None, err
        try:
            out[(size, channels)] = apply(eval_transform(size), to_channels(rgb, channels))
        except Exception as exc:
            return None, " ".join(f"preprocess failed: {type(exc).__name__}: {exc}".split())[:200]
    return out, None


def prepare_file(path: PathLike, keys: Sequence[InputKey]) -> dict[InputKey, np.ndarray]:
    """`predict`: one image file (any filesystem) -> {key: HxWxC uint8}; a failure is a UserError naming it."""
    out, err = prepare_image(read_image_file(path), keys)
    if err is not None:
        raise UserError(f"{path}: {err}")
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
        out, errors[i] = prepare_image(data, keys, max_pixels)
        for k, arr in (out or {}).items():
            arrays[k][i] = arr
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


def calibration_images(dataset: PathLike, key: InputKey, rows: int) -> np.ndarray:
    """The first `rows` decodable images of a dataset's validation split as one member input, uint8 [N, C, H, W]
    (what `--precision int8` calibrates on); a dataset without them is a UserError naming it."""
    arrays = [a[key][y >= 0] for y, a in labelled_batches(split_files(dataset, "val"), [key], max_rows=rows)]
    images = np.concatenate(arrays) if arrays else np.zeros((0, key[0], key[0], key[1]), np.uint8)
    if not len(images):
        raise UserError(f"--calibration {dataset}: no decodable images in its validation split")
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2))
