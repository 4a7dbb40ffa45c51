"""`imgcls-dist register`: --models as one self-contained directory, logged as an MLflow pyfunc model and
registered as a new version (layout: docs/design.md, "Registered models")."""

from __future__ import annotations

import json
import tempfile
import warnings
from pathlib import Path
from typing import Sequence

from imgcls_dist import __version__
from imgcls_dist.errors import UserError
from imgcls_dist.models.checkpoint import MODEL_FILE, resolve_model_path
from imgcls_dist.predictor.manifest import ENSEMBLE_FILE, as_list, resolve_model_args
from imgcls_dist.register.onnx_file import Log, is_onnx_file, prepare_onnx, refuse_onnx_members
from imgcls_dist.register.pins import installed_pins
from imgcls_dist.storage import PathLike, location
from imgcls_dist.tracking.registry import MODEL_ARTIFACT
from imgcls_dist.tracking.server import check_server, client, first_line, require_mlflow

WHAT = "register"
# What loading the model needs besides imgcls-dist, pinned to what it was registered with (register/pins.py).
PINNED = ("torch", "torchvision")
# The model's Python side, logged as code (MLflow's "models from code"): no pickled object in the model.
ENTRY = Path(__file__).with_name("pyfunc_entry.py")
SOURCE_TAG = "imgcls.models"  # the version's tag: the --models it was registered from


def stage(models: PathLike | Sequence[PathLike], dst: Path) -> Path:
    """--models as directory `dst`: one model file -> model.pt; an ensemble -> ensemble.json (the manifest's
    keys as they were, or a plain mean of the models given) with member paths relative to it, members/NN/model.pt,
    so the directory is complete wherever it is downloaded to."""
    spec = resolve_model_args(models)
    refuse_onnx_members(spec)
    dst.mkdir(parents=True)
    if spec.manifest is None and len(spec.paths) == 1:
        location(spec.paths[0]).download(dst / MODEL_FILE)
        return dst
    doc = location(spec.manifest).read_json() if spec.manifest else {"models": [{"path": p} for p in spec.paths]}
    for i, (entry, path) in enumerate(zip(doc["models"], spec.paths)):
        entry["path"] = f"members/{i:02d}/{MODEL_FILE}"
        resolve_model_path(path).download(dst / entry["path"])
    (dst / ENSEMBLE_FILE).write_text(json.dumps(doc, indent=2) + "\n")
    return dst


def requirements() -> list[str]:
    return [f"imgcls-dist=={__version__}", *installed_pins((dist,) for dist in PINNED)]


def _log(mlflow, staged: Path, classes: list[str], name: str) -> str:
    """The staged directory as a pyfunc model, registered as a new version of `name`; returns the version."""
    from imgcls_dist.register.pyfunc import signature

    with warnings.catch_warnings():
        # "no input example": the signature is given explicitly; an example would be predicted at logging
        warnings.simplefilter("ignore", UserWarning)
        info = mlflow.pyfunc.log_model(name=MODEL_ARTIFACT, python_model=str(ENTRY),
                                       artifacts={MODEL_ARTIFACT: str(staged)}, signature=signature(classes),
                                       pip_requirements=requirements(), registered_model_name=name)
    return str(info.registered_model_version)


def prepare_pyfunc(models: PathLike | Sequence[PathLike], tmp: Path) -> Log:
    """Stage --models and load it as `models:/` will load it (a bad member stops here, before any upload);
    returns what logs and registers it."""
    from imgcls_dist.predictor.predict import load_predictor

    staged = stage(models, tmp / MODEL_ARTIFACT)
    classes = load_predictor(str(staged), device="cpu", precision="fp32", backend="torch").classes
    return lambda mlflow, name: _log(mlflow, staged, classes, name)


def register_model(models: PathLike | Sequence[PathLike], name: str, alias: str | None = None) -> str:
    """Log --models as an MLflow model and register it as a new version of `name` (made if new); with `alias`,
    point the alias at it. One .onnx file (an export's) is logged as it is, with MLflow's onnx flavor. Returns
    the version. One-line UserError for anything MLflow refuses."""
    check_server(WHAT)
    mlflow = require_mlflow(WHAT)
    with tempfile.TemporaryDirectory() as tmp:
        items = as_list(models)
        log = prepare_onnx(items, Path(tmp)) if is_onnx_file(items) else prepare_pyfunc(models, Path(tmp))
        try:
            number = log(mlflow, name)
            c = client(WHAT)
            c.set_model_version_tag(name, number, SOURCE_TAG, " ".join(map(str, items)))
            if alias:
                c.set_registered_model_alias(name, alias, number)
        except Exception as e:  # noqa: BLE001 - MlflowException (bad name or alias, server errors)
            raise UserError(f"{WHAT} {name}: {first_line(e)}") from None
    return number
