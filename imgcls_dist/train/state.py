"""Training checkpoints: `model.pt` (the exported model file) + `train_state.pt` (resume) + `history.json`.

`save_training_checkpoint` writes them, `restore` turns a Ray Train checkpoint into the `ResumeState` a worker
continues from: at an epoch's end (`step` 0) or inside one (`step` = batches done, with every rank's partial
epoch totals). Everything loads with `weights_only=True`; no RNG state is stored, since every random stream is
a function of the seed and the position. Contract and reasoning: docs/design.md, "Training runs and checkpoints".
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from imgcls_dist.models.checkpoint import load_model_file, save_model_file
from imgcls_dist.train.stream import EpochProgress

TRAIN_STATE = "train_state.pt"
HISTORY = "history.json"
MID_EPOCH = "mid_epoch"  # the report key that marks a mid-epoch checkpoint (tune/report.py skips those)
MID_EPOCH_VAL_ACC = -1.0  # such a report's val_acc: below any real one, so Train never ranks it best


def mark_seen(bits: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """`bits` with the bits of sample ids `ids` set, grown (doubling) when an id is beyond it."""
    if not len(ids):
        return bits
    need = int(ids.max()) // 8 + 1
    if need > len(bits):
        bits = np.concatenate([bits, np.zeros(max(need, 2 * len(bits)) - len(bits), np.uint8)])
    np.bitwise_or.at(bits, ids >> 3, np.left_shift(1, ids & 7).astype(np.uint8))
    return bits


def count_unique(bitmaps: list[np.ndarray]) -> int:
    """Distinct sample ids over several workers' bitmaps (their bitwise or)."""
    union = np.zeros(max((len(b) for b in bitmaps), default=0), np.uint8)
    for b in bitmaps:
        union[: len(b)] |= b
    return int(np.unpackbits(union).sum())


@dataclass
class EpochStats:
    """One worker's share of an epoch (so far). Which samples it trained is a bitmap over the epoch's sample
    ids (one bit each, so at most rows/8 bytes): a list of ids grew with every row streamed, in memory, in
    every mid-epoch checkpoint and in the epoch's cross-worker gather."""

    loss_sum: float = 0.0
    correct: int = 0
    seen: int = 0
    skipped_rows: int = 0
    seen_bits: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint8))
    seconds: float = 0.0

    def mark_seen(self, ids: np.ndarray) -> None:
        self.seen_bits = mark_seen(self.seen_bits, np.asarray(ids, np.int64))

    def to_state(self) -> dict[str, Any]:
        return {"loss_sum": self.loss_sum, "correct": self.correct, "seen": self.seen,
                "skipped_rows": self.skipped_rows, "seconds": self.seconds,
                "seen_bits": torch.from_numpy(self.seen_bits.copy())}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> EpochStats:
        stats = cls(loss_sum=float(state["loss_sum"]), correct=int(state["correct"]), seen=int(state["seen"]),
                    skipped_rows=int(state["skipped_rows"]), seconds=float(state["seconds"]))
        if "seen_bits" in state:
            stats.seen_bits = state["seen_bits"].numpy().astype(np.uint8)
        else:  # a mid-epoch checkpoint written before the bitmap: the ids themselves
            stats.mark_seen(state["seen_idx"].numpy())
        return stats


def merged(parts: list[EpochStats]) -> EpochStats:
    """Several workers' partial epoch totals as one (an elastic resume hands a smaller world the totals of
    the ranks it replaces, so the epoch's sums and its exactly-once check still add up)."""
    out = EpochStats()
    for p in parts:
        out.loss_sum += p.loss_sum
        out.correct += p.correct
        out.seen += p.seen
        out.skipped_rows += p.skipped_rows
        out.seconds = max(out.seconds, p.seconds)
        bits = np.zeros(max(len(out.seen_bits), len(p.seen_bits)), np.uint8)
        bits[: len(out.seen_bits)] |= out.seen_bits
        bits[: len(p.seen_bits)] |= p.seen_bits
        out.seen_bits = bits
    return out


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
    """What a worker continues from."""

    epoch: int  # the epoch to run next
    step: int  # batches of it already trained (0: from its start)
    model_state: dict
    optimizer: dict
    schedule: dict
    scaler: dict | None
    nonfinite_total: int
    consecutive_bad: int
    history: list[dict]
    partial: list[EpochStats] | None  # per rank, when step > 0
    ema: dict | None = None  # the EMA weights (train.ema_decay)
    ema_updates: int = 0
    progress: EpochProgress | None = None  # when step > 0: per rank stream of the epoch's world, samples done


def restore(checkpoint) -> ResumeState | None:
    """A Ray Train checkpoint (or None: a fresh run) -> the state to resume from."""
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as d:
        ts = load_train_state(d)
        step = int(ts.get("step", 0))
        partial = [EpochStats.from_state(p) for p in ts["partial"]] if step else None
        # model.pt holds the EMA weights when they validated better; the raw ones then travel in the state
        raw = ts.get("raw_model") or load_model_file(d)["state_dict"]
        return ResumeState(epoch=ts["epoch"] if step else ts["epoch"] + 1, step=step,
                           model_state=raw, optimizer=ts["optimizer"],
                           schedule=ts["schedule"], scaler=ts.get("scaler"),
                           nonfinite_total=ts.get("nonfinite_total", 0), consecutive_bad=ts.get("consecutive_bad", 0),
                           history=load_history(d), partial=partial, ema=ts.get("ema"),
                           ema_updates=int(ts.get("ema_updates", 0)),
                           progress=EpochProgress.from_state(ts["progress"]) if step and ts.get("progress") else None)
