"""The Ray Data stages of batch inference: decode tasks and the predictor actor UDF, and the output schema.

decode_batch runs in CPU tasks (no torch import: those workers never need it); PredictActor loads the
ensemble once per actor and predicts the rows that decoded. Pixels travel between them as one fixed-size
binary column per member input size: a zero-copy view of the uint8 array, no extension types.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from imgcls_dist.data.schema import ID, IMAGE, LABEL
from imgcls_dist.batch.publish import ERROR
from imgcls_dist.predictor.scores import entropy_nats

if TYPE_CHECKING:  # torch stays out of the module: decode tasks import it and never need torch
    from imgcls_dist.predictor.predictor import InputKey

OUTPUT_FIELDS = [
    pa.field(ID, pa.string()),
    pa.field("pred", pa.int32()),
    pa.field("pred_name", pa.string()),
    pa.field("confidence", pa.float32()),
    pa.field("probs", pa.list_(pa.float32())),
    pa.field("entropy", pa.float32()),
    pa.field(LABEL, pa.int64()),
    pa.field(ERROR, pa.string()),
]


def output_schema(with_label: bool) -> pa.Schema:
    """The predictions schema (docs/design.md, "Predictions"); `label` only when the input has it. On error
    rows pred, pred_name, confidence, probs and entropy are all null (not NaN), and `error` says why."""
    return pa.schema([f for f in OUTPUT_FIELDS if with_label or f.name != LABEL])


def _px_column(key: InputKey) -> str:
    return f"_px_{key[0]}x{key[1]}"


def _to_fixed_binary(arr: np.ndarray) -> pa.Array:
    # One fixed-size binary value per row: a zero-copy view of the uint8 pixels, no extension types.
    arr = np.ascontiguousarray(arr)
    row_bytes = int(np.prod(arr.shape[1:]))
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(row_bytes), len(arr), [None, pa.py_buffer(arr)])


def _from_fixed_binary(col: pa.ChunkedArray | pa.Array, key: InputKey) -> np.ndarray:
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    size, channels = key
    row_bytes = size * size * channels
    flat = np.frombuffer(arr.buffers()[1], np.uint8, count=len(arr) * row_bytes, offset=arr.offset * row_bytes)
    return flat.reshape(len(arr), size, size, channels)


def decode_batch(batch: pa.Table, keys: list[InputKey], with_label: bool) -> pa.Table:
    """id/image[/label] -> id, error[, label], one pixel column per member input key."""
    from imgcls_dist.predictor.prepare import prepare_encoded  # here: the predictor actors never need albumentations

    arrays, errors = prepare_encoded(batch.column(IMAGE).to_pylist(), keys)
    cols = _row_columns(batch, errors, with_label)
    for key, arr in arrays.items():
        cols[_px_column(key)] = _to_fixed_binary(arr)
    return pa.table(cols)


def _row_columns(batch: pa.Table, errors: list[str | None], with_label: bool) -> dict[str, Any]:
    """id, error[, label as int64]: what travels beside the pixels (or the predictions) of decoded rows."""
    cols: dict[str, Any] = {ID: batch.column(ID), ERROR: pa.array(errors, pa.string())}
    if with_label:
        cols[LABEL] = batch.column(LABEL).cast(pa.int64())
    return cols


class PredictActor:
    """Ray Data actor UDF: loads the ensemble once per actor, predicts the rows that decoded."""

    def __init__(self, model_paths, views, weights, combine, temperatures, batch_size, torch_threads, with_label,
                 compile=False, precision="auto", backend="torch", calibration=None):
        import torch

        from imgcls_dist.predictor.predictor import EnsemblePredictor

        torch.set_num_threads(torch_threads)
        self.predictor = EnsemblePredictor(model_paths, views=views, weights=weights, combine=combine,
                                           temperatures=temperatures, batch_size=batch_size, compile=compile,
                                           precision=precision, backend=backend, calibration=calibration)
        self.with_label = with_label
        self.schema = output_schema(with_label)

    def __call__(self, batch: pa.Table) -> pa.Table:
        ok = batch.column(ERROR).is_null().to_numpy(zero_copy_only=False)
        keys = self.predictor.input_keys
        return self._predict(batch, ok, lambda idx: {k: _from_fixed_binary(batch.column(_px_column(k)), k)[idx]
                                                     for k in keys})

    def _predict(self, rows: pa.Table, ok: np.ndarray, images_of) -> pa.Table:
        """Predictions for the `ok` rows (`images_of(their indices)` gives their inputs), nulls for the rest."""
        idx = np.flatnonzero(ok)
        probs = np.zeros((rows.num_rows, len(self.predictor.classes)), np.float32)
        if len(idx):
            probs[idx] = self.predictor.predict_uint8(images_of(idx))
        return predictions_table(rows, probs, ok, self.predictor.classes, self.schema)


class DevicePredictActor(PredictActor):
    """PredictActor for `--decode device`: its rows arrive undecoded and it decodes them itself, JPEGs on its
    device (predictor/device_decode.py), the rest on its CPUs; a row neither can decode gets its error string."""

    def __call__(self, batch: pa.Table) -> pa.Table:
        import torch  # here, not at the top: the decode tasks import this module and never need torch

        from imgcls_dist.predictor.device_decode import prepare_on_device

        device = self.predictor.device
        images, errors = prepare_on_device(batch.column(IMAGE).to_pylist(), self.predictor.input_keys, device)
        ok = np.array([e is None for e in errors], dtype=bool)
        rows = pa.table(_row_columns(batch, errors, self.with_label))
        return self._predict(rows, ok, lambda idx: {k: v[torch.as_tensor(idx, device=device)]
                                                    for k, v in images.items()})


def predictions_table(batch: pa.Table, probs: np.ndarray, ok: np.ndarray, classes: list[str],
                      schema: pa.Schema) -> pa.Table:
    """Rows of `batch` + ensembled probabilities -> the output schema (nulls where not ok)."""
    null = pa.array(~ok)
    pred = probs.argmax(axis=1).astype(np.int32)
    conf = probs.max(axis=1).astype(np.float32)
    entropy = entropy_nats(probs)
    num_classes = probs.shape[1]
    lengths = np.where(ok, num_classes, 0)
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    values = pa.array(probs[ok].reshape(-1), pa.float32())
    names = np.asarray(classes, dtype=object)[pred]
    cols = {
        ID: batch.column(ID),
        "pred": pa.array(pred, pa.int32(), mask=~ok),
        "pred_name": pa.array(names, pa.string(), mask=~ok),
        "confidence": pa.array(conf, pa.float32(), mask=~ok),
        "probs": pa.ListArray.from_arrays(offsets, values, type=pa.list_(pa.float32()), mask=null),
        "entropy": pa.array(entropy, pa.float32(), mask=~ok),
        LABEL: batch.column(LABEL) if LABEL in schema.names else None,
        ERROR: batch.column(ERROR),
    }
    return pa.Table.from_arrays([cols[f.name] for f in schema], schema=schema)
