"""`models:/NAME/VERSION` and `models:/NAME@ALIAS` wherever a model path is accepted: the registered version's
files as a path `resolve_model_args` reads like any other (docs/design.md, "Registered models").

An alias is looked up on every use (aliases move); a version's files never change, so a downloaded version is
kept in a local cache (`model_cache_dir()`) and a second use asks the server nothing. A version whose artifacts
live in s3:// or gs:// is read from there directly: every node of a cluster reads it as it reads any model path.
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from pathlib import Path
from urllib.parse import quote

from imgcls_dist.errors import UserError
from imgcls_dist.tracking.server import check_server, client, first_line, require_mlflow, tracking_uri

SCHEME = "models:/"
# Where our files sit inside the logged MLflow model: `artifacts={MODEL_ARTIFACT: dir}` puts them there.
MODEL_ARTIFACT = "model"
MODEL_SUBDIR = f"artifacts/{MODEL_ARTIFACT}"
CACHE_ENV = "IMGCLS_DIST_MODEL_CACHE"
# Artifact stores our storage layer reads itself (imgcls_dist/storage.py): no download, no cache.
DIRECT_SCHEMES = ("s3://", "gs://")
# The version tag `register` puts on an ONNX graph it registers (register/onnx_file.py): MLflow's onnx flavor, a
# model this package's predictor does not run, told apart before any download.
FORMAT_TAG, ONNX_FORMAT = "imgcls.format", "onnx"
_URI = re.compile(r"models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[\w-]+))/?")
FORMS = "models:/NAME/VERSION or models:/NAME@ALIAS"


def is_registry_uri(path: object) -> bool:
    return isinstance(path, str) and path.startswith(SCHEME)


def model_cache_dir() -> Path:
    """Downloaded model versions: $IMGCLS_DIST_MODEL_CACHE, else imgcls-dist/models in the user's cache
    directory ($XDG_CACHE_HOME or ~/.cache)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "imgcls-dist" / "models"


def parse(uri: str) -> tuple[str, str | None, str | None]:
    """models:/NAME/VERSION -> (NAME, VERSION, None); models:/NAME@ALIAS -> (NAME, None, ALIAS)."""
    m = _URI.fullmatch(uri)
    if not m or m["name"] in (".", ".."):
        raise UserError(f"{uri}: not a registered model URI (expected {FORMS})")
    return m["name"], m["version"], m["alias"]


def _server_key(tracking_uri: str) -> str:
    """The tracking server as one directory name: two servers may hold different models of the same name."""
    return re.sub(r"[^A-Za-z0-9.-]+", "_", tracking_uri.split("://", 1)[-1]).strip("_")[:100] or "local"


def version_dir(tracking_uri: str, name: str, version: str) -> Path:
    return model_cache_dir() / _server_key(tracking_uri) / quote(name, safe="") / version


def _version_of(c, uri: str, name: str, alias: str) -> str:
    try:
        return str(c.get_model_version_by_alias(name, alias).version)
    except Exception as e:  # noqa: BLE001 - MlflowException: unknown model or alias
        raise UserError(f"{uri}: no registered model {name!r} with alias {alias!r} ({first_line(e)})") from None


def _download_uri(c, uri: str, name: str, version: str) -> str:
    try:
        tags = c.get_model_version(name, version).tags
        source = c.get_model_version_download_uri(name, version)
    except Exception as e:  # noqa: BLE001 - MlflowException: unknown model or version
        raise UserError(f"{uri}: no registered model {name!r} version {version} ({first_line(e)})") from None
    _check_runnable(uri, tags)
    return source


def _check_runnable(uri: str, tags: dict[str, str]) -> None:
    """An ONNX version has no artifacts/model: refused by name, not by a failed download of what is not there."""
    if tags.get(FORMAT_TAG) == ONNX_FORMAT:
        raise UserError(f"{uri}: an ONNX model (an `imgcls-dist export` graph); predict, infer, serve, export and "
                        "ensemble build run model.pt and ensemble.json versions only: run it with onnxruntime, "
                        "mlflow.onnx.load_model or mlflow.pyfunc.load_model")


def _check_ours(uri: str, local: Path) -> None:
    if not ((local / "model.pt").is_file() or (local / "ensemble.json").is_file()):
        raise UserError(f"{uri}: not a model registered by imgcls-dist (no model.pt or ensemble.json in "
                        f"{MODEL_SUBDIR})")


def _download(uri: str, source: str, dest: Path) -> Path:
    """The version's files into `dest`, atomically: they are downloaded and checked beside it, then renamed into
    place, so a killed download (a `.partial-*` directory, safe to delete) is never taken for a complete one."""
    import mlflow

    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.parent / f".partial-{dest.name}-{uuid.uuid4().hex[:8]}"
    try:
        try:
            got = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(partial)))
        except Exception as e:  # noqa: BLE001 - MlflowException, requests errors: the download failed
            raise UserError(f"{uri}: cannot download {source} ({first_line(e)})") from None
        _check_ours(uri, got)
        try:
            os.rename(got, dest)
        except OSError:
            if not dest.is_dir():  # else another process finished the same download first: theirs is as good
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return dest


def fetch_model(uri: str) -> str:
    """A registered model URI -> the directory (local, or an s3:// or gs:// URI) holding its model.pt or
    ensemble.json, for `resolve_model_args`. One-line UserError for a bad URI, an unknown name, version or
    alias, and a server that cannot be reached."""
    name, version, alias = parse(uri)
    require_mlflow(uri)
    server = tracking_uri()
    if version is not None and version_dir(server, name, version).is_dir():
        return str(version_dir(server, name, version))
    check_server(uri)
    c = client(uri)
    version = version or _version_of(c, uri, name, alias)
    cached = version_dir(server, name, version)
    if cached.is_dir():
        return str(cached)
    source = f"{_download_uri(c, uri, name, version).rstrip('/')}/{MODEL_SUBDIR}"
    if source.startswith(DIRECT_SCHEMES):
        return source
    return str(_download(uri, source, cached))
