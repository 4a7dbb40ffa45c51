"""The exported model file (`model.pt`; docs/design.md, "Model file"): plain types only, loadable with
weights_only=True.

File I/O only, on any filesystem: rebuilding the network from a file is `registry.build_model_from_file`
(this module stays below the registry in the import tree).
"""

from __future__ import annotations

import io
import math
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
        raise UserError(f"{loc}: cannot load model file ({_load_failure(e)})") from None


def _load_failure(e: Exception) -> str:
    """torch.load's failure in a few words. The weights-only unpickler's message is paragraphs about torch's
    defaults and how to load the file anyway; what the file holds is its last line but the documentation link
    ("Trying to load unsupported GLOBAL posix.system ...", "Unsupported operand 0"). Other errors: the first
    sentence (miniz's go on about corruption); some have no message at all (EOFError)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    if lines and lines[0].startswith("Weights only load failed"):
        said = [ln for ln in lines[1:] if not ln.startswith(("(1)", "(2)", "Check the documentation"))]
        reason = (said or ["unsupported content"])[-1].split("WeightsUnpickler error:")[-1].split(" Please use")[0]
        return f"refused by the weights-only unpickler: {reason.strip()[:200]}"
    return f"{type(e).__name__}: {lines[0].split('. ')[0][:200]}" if lines else type(e).__name__


def load_model_file(path: PathLike) -> dict[str, Any]:
    """Load and validate a model file; `path` is its file or directory, on any filesystem."""
    p = resolve_model_path(path)
    payload = read_tensors_file(p)
    if not isinstance(payload, dict):
        raise UserError(f"{p}: not a model file (top level is {type(payload).__name__}, expected dict)")
    missing = [k for k in REQUIRED_KEYS if k not in payload]
    if missing:
        raise UserError(f"{p}: not a model file, missing keys {missing}")
    wrong = _wrong_types(payload)
    if wrong:
        raise UserError(f"{p}: not a model file, '{wrong[0]}' must be {wrong[1]}")
    payload["path"] = p.uri
    return payload


def _numbers(v: Any, n: Any) -> bool:
    """A list of n finite numbers (n from the file too: anything; an int is finite, and math.isfinite would
    overflow on a huge one)."""
    return type(n) is int and isinstance(v, list) and len(v) == n \
        and all(type(x) is int or type(x) is float and math.isfinite(x) for x in v)


def _wrong_types(payload: dict[str, Any]) -> tuple[str, str] | None:
    """(key, what it must be) for the first key whose value is not what save_model_file writes (docs/design.md,
    "Model file"), else None: a damaged file is refused here rather than deep in the network build or predictor."""
    classes, channels = payload["classes"], payload["in_channels"]
    checks = [
        ("state_dict", "a dict of tensors", isinstance(payload["state_dict"], dict)
         and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in payload["state_dict"].items())),
        ("arch", "a model name", isinstance(payload["arch"], str)),
        ("classes", "a non-empty list of class names",
         isinstance(classes, list) and bool(classes) and all(isinstance(c, str) for c in classes)),
        ("num_classes", "the number of classes", type(payload["num_classes"]) is int
         and isinstance(classes, list) and payload["num_classes"] == len(classes)),
        ("in_channels", "1 or 3", type(channels) is int and channels in (1, 3)),
        ("image_size", "a positive integer", type(payload["image_size"]) is int and payload["image_size"] > 0),
        ("mean", "a number per input channel", _numbers(payload["mean"], channels)),
        ("std", "a positive number per input channel", _numbers(payload["std"], channels)
         and all(x > 0 for x in payload["std"])),
        ("config", "a dict", isinstance(payload.get("config", {}), dict)),
        ("metrics", "a dict", isinstance(payload.get("metrics", {}), dict)),
        ("hflip", "true or false", isinstance(payload.get("hflip", True), bool)),
    ]
    return next(((key, what) for key, what, ok in checks if not ok), None)
