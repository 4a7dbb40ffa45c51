"""Training checkpoints: `model.pt` (design.md export) + `train_state.pt` (resume) + `history.json`.

Everything is plain tensors/containers so both files load with `weights_only=True`. RNG state is not
stored: every random stream (shuffle, augmentation, MixUp, dropout) is reseeded from (seed, epoch, rank)
at each epoch start, so resuming at epoch e reproduces exactly what an uninterrupted run would do.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from imgcls_dist.models.checkpoint import load_model_file, save_model_file

TRAIN_STATE = "train_state.pt"
HISTORY = "history.json"


def save_training_checkpoint(directory: Path, *, model_state: dict, model_meta: dict, train_state: dict,
                             history: list[dict]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    save_model_file(directory, state_dict=model_state, **model_meta)
    torch.save(train_state, directory / TRAIN_STATE)
    (directory / HISTORY).write_text(json.dumps(history, indent=1))
    return directory


def load_train_state(directory: str | Path) -> dict[str, Any]:
    return torch.load(Path(directory) / TRAIN_STATE, map_location="cpu", weights_only=True)


def load_history(directory: str | Path) -> list[dict]:
    p = Path(directory) / HISTORY
    return json.loads(p.read_text()) if p.is_file() else []


@dataclass
class ResumeState:
    """What a worker continues from: the checkpoint of the last finished epoch."""

    epoch: int
    model_state: dict
    optimizer: dict
    schedule: dict
    scaler: dict | None
    nonfinite_total: int
    history: list[dict]


def restore(checkpoint) -> ResumeState | None:
    """A Ray Train checkpoint (or None: a fresh run) -> the state to resume from."""
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as d:
        train_state = load_train_state(d)
        return ResumeState(epoch=train_state["epoch"], model_state=load_model_file(d)["state_dict"],
                           optimizer=train_state["optimizer"], schedule=train_state["schedule"],
                           scaler=train_state.get("scaler"), nonfinite_total=train_state.get("nonfinite_total", 0),
                           history=load_history(d))
