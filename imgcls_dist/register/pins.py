"""The pip requirements a registered model is logged with: given explicitly, pinned to what is installed here,
because MLflow's own inference of them loads and times the model (slow) and cannot see which code runs it."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Iterable, Sequence


def installed_pins(alternatives: Iterable[Sequence[str]]) -> list[str]:
    """`dist==version` for each group's first distribution installed here (e.g. onnxruntime or onnxruntime-gpu);
    a group with none installed is left out."""
    pins = []
    for dists in alternatives:
        for dist in dists:
            try:
                pins.append(f"{dist}=={version(dist)}")
                break
            except PackageNotFoundError:
                continue
    return pins
