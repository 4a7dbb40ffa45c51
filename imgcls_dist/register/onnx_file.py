"""`register` of an ONNX file written by `imgcls-dist export`: the graph as it is (uint8 NCHW images in, class
probabilities out, preprocessing inside) logged with MLflow's onnx flavor and registered as a new version tagged
ONNX, which `models:/` refuses by name in predict, infer and serve (tracking/registry.py): they run model.pt and
ensemble.json versions; this one is for onnxruntime, `mlflow.onnx` and `mlflow.pyfunc`."""

from __future__ import annotations

import importlib.util
import json
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

from imgcls_dist.errors import UserError
from imgcls_dist.predictor.manifest import EnsembleSpec
from imgcls_dist.predictor.onnx_runtime import INSTALL_HINT
from imgcls_dist.register.pins import installed_pins
from imgcls_dist.storage import PathLike, location
from imgcls_dist.tracking.registry import FORMAT_TAG, MODEL_ARTIFACT, ONNX_FORMAT
from imgcls_dist.tracking.server import first_line

SUFFIX = ".onnx"
# Reading the file needs onnx; the registered model runs in onnxruntime, whose version is pinned with onnx's.
RUNTIME = ("onnx", "onnxruntime")
RUNTIME_DISTS = (("onnx",), ("onnxruntime", "onnxruntime-gpu"))  # the distributions that provide each
# The export's metadata_props (export/onnx_export.py, `graph_metadata`) the signature is made of.
NEEDED = ("classes", "image_size", "in_channels")
Log = Callable[[Any, str], str]  # (mlflow, registered name) -> the new version


def is_onnx_file(models: Sequence[PathLike]) -> bool:
    return len(models) == 1 and str(models[0]).endswith(SUFFIX)


def refuse_onnx_members(spec: EnsembleSpec) -> None:
    """An export's NAME-onnx/ensemble.json (members of several input sizes, or a vote) or several .onnx files:
    no one graph to log, and the combining would be ours to ship as code."""
    if any(str(p).endswith(SUFFIX) for p in spec.paths):
        raise UserError(f"{spec.manifest or spec.paths[0]}: several ONNX files cannot be registered as one model; "
                        "register a single-graph export (NAME.onnx), or the ensemble.json of the .pt members")


def _require_runtime() -> None:
    missing = [m for m in RUNTIME if importlib.util.find_spec(m) is None]
    if missing:
        raise UserError(f"register of an ONNX file needs {', '.join(missing)}, not installed: {INSTALL_HINT}")


def read_graph(path: PathLike, tmp: Path) -> tuple[Any, dict[str, str]]:
    """The file (any filesystem) as an onnx.ModelProto and its metadata_props."""
    import onnx

    src = location(path)
    if not src.is_file():
        raise UserError(f"{path}: no such ONNX file")
    local = src.local_copy(tmp)
    try:
        model = onnx.load(local)
    except Exception as e:  # noqa: BLE001 - protobuf's DecodeError and onnx's own: not an ONNX file
        raise UserError(f"{path}: cannot be read as ONNX ({first_line(e)})") from None
    meta = {p.key: p.value for p in model.metadata_props}
    missing = [k for k in NEEDED if k not in meta]
    if missing or len(model.graph.input) != 1 or len(model.graph.output) != 1:
        raise UserError(f"{path}: not an ONNX file written by `imgcls-dist export` (one input, one output, and "
                        f"the metadata {', '.join(NEEDED)})")
    return model, meta


def input_shape(path: PathLike, model, meta: dict[str, str]) -> tuple[int, ...]:
    """(-1, C, H, W) from the metadata, after checking the graph's input says the same (uint8, that shape)."""
    import onnx

    c, s = int(meta["in_channels"]), int(meta["image_size"])
    tensor = model.graph.input[0].type.tensor_type
    if tensor.elem_type != onnx.TensorProto.UINT8 or [d.dim_value for d in tensor.shape.dim[1:]] != [c, s, s]:
        raise UserError(f"{path}: its input is not uint8 [batch, {c}, {s}, {s}], as its metadata says")
    return (-1, c, s, s)


def signature(model, shape: tuple[int, ...], num_classes: int):
    """Tensors named as the graph's own input and output, so that a dict feed and the signature agree."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    inputs = Schema([TensorSpec(np.dtype(np.uint8), shape, model.graph.input[0].name)])
    outputs = Schema([TensorSpec(np.dtype(np.float32), (-1, num_classes), model.graph.output[0].name)])
    return ModelSignature(inputs=inputs, outputs=outputs)


def prepare_onnx(models: Sequence[PathLike], tmp: Path) -> Log:
    """Read and check the file now (a file that is not an export's stops before any upload); returns what logs
    and registers it."""
    _require_runtime()
    model, meta = read_graph(models[0], tmp)
    sig = signature(model, input_shape(models[0], model, meta), len(json.loads(meta["classes"])))

    def log(mlflow, name: str) -> str:
        import mlflow.onnx

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "no input example": the signature is explicit
            # one file, as the export wrote it (MLflow's default moves the weights out into separate files)
            info = mlflow.onnx.log_model(model, name=MODEL_ARTIFACT, signature=sig, pip_requirements=installed_pins(RUNTIME_DISTS),
                                         save_as_external_data=False)
        # the tag with the version, in one call: a version is never seen without it
        return str(mlflow.register_model(info.model_uri, name, tags={FORMAT_TAG: ONNX_FORMAT}).version)

    return log
