"""The exported model file (`model.pt`; docs/design.md, "Model file"): plain types only, loadable with
weights_only=True.

File I/O only, on any filesystem: rebuilding the network from a file is `registry.build_model_from_file`
(this module stays below the registry in the import tree).
"""

from __future__ import annotations

import io
from typing import Any

import torch

from imgcls_dist.errors import UserError
from imgcls_dist.storage import Location, PathLike, location

MODEL_FILE = "model.pt"
REQUIRED_KEYS = ("state_dict", "arch", "num_classes", "classes", "in_channels", "image_size", "mean", "std")


def save_model_file(
    path: PathLike,
    *,
    model: torch.nn.Module | None = None,
    state_dict: dict | None = None,
    arch: str,
    classes: list[str],
    in_channels: int,
    image_size: int,
    mean: list[float],
    std: list[float],
    config: dict | None = None,
    metrics: dict | None = None,
    hflip: bool = True,
) -> Location:
    """Write a model file (docs/design.md, "Model file"). `path` (any filesystem) may be a directory: model.pt
    is written inside."""
    loc = location(path)
    if loc.suffix != ".pt":
        loc = loc / MODEL_FILE
    if state_dict is None:
        assert model is not None, "give model or state_dict"
        state_dict = model.state_dict()
    payload = {
        "state_dict": {k: v.detach().cpu().contiguous() for k, v in state_dict.items()},
        "arch": arch,
        "num_classes": len(classes),
        "classes": [str(c) for c in classes],
        "in_channels": int(in_channels),
        "image_size": int(image_size),
        "mean": [float(x) for x in mean],
        "std": [float(x) for x in std],
        "config": config or {},
        "metrics": {k: float(v) for k, v in (metrics or {}).items()},
        # Whether mirrored inputs are still the same class: TTA picks its default views from this.
        "hflip": bool(hflip),
    }
    buf = io.BytesIO()
    torch.save(payload, buf)
    return loc.write_bytes(buf.getvalue())  # atomic: a reader never sees a half-written model


def resolve_model_path(path: PathLike) -> Location:
    """A model file, or a checkpoint/run directory holding model.pt (any filesystem)."""
    loc = location(path)
    if loc.suffix != ".pt" and loc.is_dir():
        loc = loc / MODEL_FILE
    if not loc.is_file():
        if not loc.is_local:
            loc.parent.check_readable("directory")  # a missing bucket or prefix says so
        raise UserError(f"{path}: no model file (expected a checkpoint directory with {MODEL_FILE} or a .pt file)")
    return loc


def read_tensors_file(loc: Location) -> Any:
    """torch.load of a file on any filesystem, weights_only=True: no code in a checkpoint ever runs."""
    data = loc.read_bytes()
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure to unpickle is a bad file for the user
        raise UserError(f"{loc}: cannot load model file ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None


def load_model_file(path: PathLike) -> dict[str, Any]:
    """Load and validate a model file; `path` is its file or directory, on any filesystem."""
    p = resolve_model_path(path)
    payload = read_tensors_file(p)
    if not isinstance(payload, dict):
        raise UserError(f"{p}: not a model file (top level is {type(payload).__name__}, expected dict)")
    missing = [k for k in REQUIRED_KEYS if k not in payload]
    if missing:
        raise UserError(f"{p}: not a model file, missing keys {missing}")
    payload["path"] = p.uri
    return payload
