"""The exported model file (`model.pt`) of design.md: plain types only, loadable with weights_only=True."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from imgcls_dist.errors import UserError

MODEL_FILE = "model.pt"
REQUIRED_KEYS = ("state_dict", "arch", "num_classes", "classes", "in_channels", "image_size", "mean", "std")


def save_model_file(
    path: str | os.PathLike,
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
) -> Path:
    """Write a design.md model file. `path` may be a directory (model.pt is written inside)."""
    path = Path(path)
    if path.suffix != ".pt":
        path.mkdir(parents=True, exist_ok=True)
        path = path / MODEL_FILE
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
    tmp = path.with_suffix(".pt.tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)  # atomic: a reader never sees a half-written model
    return path


def resolve_model_path(path: str | os.PathLike) -> Path:
    p = Path(path)
    if p.is_dir():
        p = p / MODEL_FILE
    if not p.is_file():
        raise UserError(f"{path}: no model file (expected a checkpoint directory with {MODEL_FILE} or a .pt file)")
    return p


def load_model_file(path: str | os.PathLike) -> dict[str, Any]:
    """Load and validate a model file (weights_only=True: no code in a checkpoint ever runs)."""
    p = resolve_model_path(path)
    try:
        payload = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure to unpickle is a bad file for the user
        raise UserError(f"{p}: cannot load model file ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    if not isinstance(payload, dict):
        raise UserError(f"{p}: not a model file (top level is {type(payload).__name__}, expected dict)")
    missing = [k for k in REQUIRED_KEYS if k not in payload]
    if missing:
        raise UserError(f"{p}: not a model file, missing keys {missing}")
    return payload


def build_model_from_file(path: str | os.PathLike) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild the network from the registry and load its weights; returns (model in eval mode, metadata)."""
    from imgcls_dist.models.registry import get_model

    payload = load_model_file(path)
    model = get_model(payload["arch"], num_classes=payload["num_classes"], in_channels=payload["in_channels"])
    model.load_state_dict(payload["state_dict"])
    model.eval()
    meta = {k: v for k, v in payload.items() if k != "state_dict"}
    meta["path"] = str(resolve_model_path(path))
    return model, meta
