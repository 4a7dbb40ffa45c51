"""An ensemble of model files with test-time augmentation, as one callable on uint8 batches.

Each member keeps its own input size, channel count and mean/std (all from its model file, never
retyped); members only have to agree on `classes`. Per member, all TTA views of a micro-batch go
through ONE forward ([V*N,C,H,W]); view probabilities are averaged, then members are combined:

- "mean":     plain average of member probabilities.
- "weighted": weighted average, weights normalized to sum 1 (e.g. from a tune campaign's ensemble.json).
- "vote":     each member votes for its argmax class (with its weight; equal if none given); the output
              is the vote share per class. Ties are broken by the members' averaged probabilities:
              the output is (votes + eps * soft) / (1 + eps) with eps = 1e-3, which still sums to 1,
              changes no vote share by more than 1e-3, and makes argmax pick the tied class the
              members were jointly most confident in (rather than the lowest class index).
"""

from __future__ import annotations

import json
import math
import os
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from imgcls_dist.errors import UserError
from imgcls_dist.infer.tta import apply_views, default_views, resolve_views
from imgcls_dist.models.checkpoint import MODEL_FILE, resolve_model_path
from imgcls_dist.models.preprocess import normalize
from imgcls_dist.models.registry import build_model_from_file
from imgcls_dist.storage import PathLike, is_uri, location

InputKey = tuple[int, int]  # (image_size, channels), as in infer.prepare (not imported: it pulls albumentations)
COMBINES = ("mean", "weighted", "vote")
ENSEMBLE_FILE = "ensemble.json"
VOTE_TIE_EPS = 1e-3


@dataclass
class Member:
    path: str
    model: torch.nn.Module
    meta: dict[str, Any]
    weight: float

    @property
    def key(self) -> InputKey:
        return (int(self.meta["image_size"]), int(self.meta["in_channels"]))


def resolve_combine(combine: str | None, weights: Sequence[float] | None) -> str:
    """None -> "weighted" when weights are given, else "mean"."""
    if combine is None:
        return "weighted" if weights is not None else "mean"
    if combine not in COMBINES:
        raise UserError(f"--combine: unknown method {combine!r}; valid: {', '.join(COMBINES)}")
    if combine == "mean" and weights is not None:
        raise UserError("--combine mean ignores weights; use --combine weighted (or vote) with --weights")
    if combine == "weighted" and weights is None:
        raise UserError("--combine weighted needs --weights (or an ensemble.json with a weight per model)")
    return combine


def normalize_weights(weights: Sequence[float] | None, n: int) -> list[float]:
    if weights is None:
        return [1.0 / n] * n
    w = [float(x) for x in weights]
    if len(w) != n:
        raise UserError(f"--weights: got {len(w)} weights for {n} models")
    if any(not math.isfinite(x) or x < 0 for x in w) or sum(w) <= 0:
        raise UserError(f"--weights: must be finite, >= 0 and not all zero, got {w}")
    total = sum(w)
    return [x / total for x in w]


def load_ensemble_manifest(path: PathLike) -> tuple[list[str], list[float] | None, str]:
    """ensemble.json (any filesystem) -> (member URIs/paths, weights or None, combine). A member path is a
    URI, an absolute path, or relative to the manifest's directory.

    Format: {"models": [{"path": "...", "weight": 0.5, "name": "...", "val_acc": 0.98}, ...],
             "combine": "weighted", "weight_rule": "..."}; weight and combine are optional.
    """
    p = location(path)
    try:
        doc = json.loads(p.read_text())
    except UnicodeDecodeError:
        raise UserError(f"{p}: not a JSON ensemble manifest (not UTF-8 text)") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{p}: invalid JSON ({e.msg} at line {e.lineno})") from None
    entries = doc.get("models") if isinstance(doc, dict) else None
    if not isinstance(entries, list) or not entries:
        raise UserError(f"{p}: 'models' must be a non-empty list of {{\"path\": ...}} entries")
    paths, weights = [], []
    for i, e in enumerate(entries):
        if not isinstance(e, dict) or not isinstance(e.get("path"), str):
            raise UserError(f"{p}: models[{i}] must be an object with a string 'path'")
        mp = e["path"]
        paths.append(mp if is_uri(mp) or Path(mp).is_absolute() else (p.parent / mp).uri)
        weights.append(e.get("weight"))
    given = [w is not None for w in weights]
    if any(given) and not all(given):
        raise UserError(f"{p}: either every model has a 'weight' or none does")
    if any(given) and not all(isinstance(w, (int, float)) and not isinstance(w, bool) for w in weights):
        raise UserError(f"{p}: every 'weight' must be a number")
    w_out = [float(w) for w in weights] if all(given) else None
    combine = resolve_combine(doc.get("combine"), w_out)
    if combine == "mean":
        w_out = None
    return paths, w_out, combine


def resolve_model_args(models: PathLike | Sequence[PathLike]) -> tuple[list[str], list[float] | None, str | None]:
    """CLI --models values (any filesystem) -> (model file URIs, weights, combine). One ensemble.json (or a
    directory holding one and no model.pt) is read as a manifest; anything else is a list of model files/dirs."""
    items = [models] if isinstance(models, (str, os.PathLike)) else list(models)
    if not items:
        raise UserError("--models: give one ensemble.json or at least one model file/directory")
    if len(items) == 1:
        p = location(items[0])
        if p.suffix == ".json":
            return load_ensemble_manifest(p)
        if p.is_dir() and not (p / MODEL_FILE).exists() and (p / ENSEMBLE_FILE).is_file():
            return load_ensemble_manifest(p / ENSEMBLE_FILE)
    jsons = [str(x) for x in items if str(x).endswith(".json")]
    if jsons:
        raise UserError(f"--models: an ensemble manifest must be the only --models value, "
                        f"got {jsons[0]} among {len(items)}")
    return [resolve_model_path(x).uri for x in items], None, None


def resolve_ensemble(
    models: str | Path | Sequence[str | Path],
    weights: Sequence[float] | None = None,
    combine: str | None = None,
) -> tuple[list[str], list[float] | None, str | None]:
    """--models/--weights/--combine -> (paths, weights, combine). Explicit weights replace a manifest's;
    an explicit --combine mean drops the manifest's weights (plain average)."""
    paths, m_weights, m_combine = resolve_model_args(models)
    if weights is None and combine != "mean":
        weights = m_weights
        combine = combine if combine is not None else m_combine
    return paths, (list(weights) if weights is not None else None), combine


def pick_device(device: str | torch.device | None = None) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class EnsemblePredictor:
    """Loads each model once; `predict_uint8` maps uint8 batches to ensembled class probabilities.

    `batch_size` is images per forward before TTA: each forward holds batch_size * len(views) rows.
    """

    def __init__(
        self,
        model_paths: Sequence[str | Path],
        views: str | Sequence[str] | None = None,
        weights: Sequence[float] | None = None,
        combine: str | None = None,
        device: str | torch.device | None = None,
        batch_size: int = 128,
    ):
        if not model_paths:
            raise UserError("no models given")
        if batch_size < 1:
            raise UserError(f"--batch-size: must be >= 1, got {batch_size}")
        self.combine = resolve_combine(combine, weights)
        self.weights = normalize_weights(weights, len(model_paths))
        self.device = pick_device(device)
        self.batch_size = int(batch_size)
        cuda = self.device.type == "cuda"
        # bf16 keeps fp32's range (no overflow in logits); fp16 only on GPUs without bf16 (pre-Ampere).
        self.amp_dtype = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if cuda else None
        self.channels_last = cuda
        self.members: list[Member] = []
        for path, w in zip(model_paths, self.weights):
            model, meta = build_model_from_file(path)
            if self.members and list(meta["classes"]) != list(self.members[0].meta["classes"]):
                first = self.members[0]
                raise UserError(
                    f"models disagree on classes: {first.meta['path']} has {_short(first.meta['classes'])}, "
                    f"{meta['path']} has {_short(meta['classes'])}"
                )
            model = model.to(self.device, memory_format=torch.channels_last) if cuda else model.to(self.device)
            self.members.append(Member(meta["path"], model.eval(), meta, w))
        self.classes: list[str] = list(self.members[0].meta["classes"])
        self.hflip_ok = all(bool(m.meta.get("hflip", True)) for m in self.members)
        self.views = resolve_views(views, self.hflip_ok, default_views([m.meta for m in self.members]))

    @property
    def input_keys(self) -> list[InputKey]:
        return sorted({m.key for m in self.members})

    def describe(self) -> list[dict[str, Any]]:
        """Plain-typed member summary for manifests and logs."""
        return [
            {"path": m.path, "arch": m.meta["arch"], "image_size": m.key[0], "in_channels": m.key[1],
             "weight": m.weight, "metrics": m.meta.get("metrics", {})}
            for m in self.members
        ]

    def predict_uint8(
        self, images: dict[InputKey, torch.Tensor | np.ndarray], return_members: bool = False
    ) -> np.ndarray | tuple[np.ndarray, list[np.ndarray]]:
        """{(size, channels): uint8 [N,C,H,W] tensor} -> ensembled probs (N, num_classes) float32.

        Keys are (image_size, channels) because a 1-channel member needs its own decode (as in training);
        a plain int key means (size, 3). NHWC numpy arrays (what the decode stage produces) are accepted
        too. With return_members, also each member's view-averaged probabilities.
        """
        batches = {((k, 3) if isinstance(k, int) else tuple(k)): _as_nchw(v) for k, v in images.items()}
        missing = [k for k in self.input_keys if k not in batches]
        if missing:
            raise ValueError(f"predict_uint8: no input for member keys {missing} (have {sorted(batches)})")
        n = len(batches[self.input_keys[0]])
        out = np.empty((n, len(self.classes)), np.float32)
        per_member = [np.empty_like(out) for _ in self.members] if return_members else []
        for start in range(0, n, self.batch_size):
            sl = slice(start, min(n, start + self.batch_size))
            probs = [self._member_probs(m, batches[m.key][sl]) for m in self.members]
            out[sl] = self._combine(probs).numpy()
            for dst, p in zip(per_member, probs):
                dst[sl] = p.numpy()
        return (out, per_member) if return_members else out

    def _member_probs(self, m: Member, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        x = x.to(self.device, non_blocking=True)
        amp = torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype else nullcontext()
        with torch.inference_mode(), amp:
            xv = normalize(apply_views(x, self.views), m.meta["mean"], m.meta["std"], channels_last=self.channels_last)
            logits = m.model(xv)
            probs = logits.float().softmax(dim=-1)
        return probs.view(len(self.views), n, -1).mean(dim=0).cpu()

    def _combine(self, probs: list[torch.Tensor]) -> torch.Tensor:
        w = torch.tensor(self.weights, dtype=torch.float32).view(-1, 1, 1)
        stacked = torch.stack(probs)  # [M, N, C]
        soft = (stacked * w).sum(dim=0)
        if self.combine != "vote":
            return soft
        votes = torch.zeros_like(soft)
        for p, wi in zip(probs, self.weights):
            votes[torch.arange(p.shape[0]), p.argmax(dim=-1)] += wi
        return (votes + VOTE_TIE_EPS * soft) / (1.0 + VOTE_TIE_EPS)


def _as_nchw(x: torch.Tensor | np.ndarray) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2)
    return x


def _short(classes: Sequence[str], k: int = 6) -> str:
    cl = list(classes)
    return f"{len(cl)} classes [{', '.join(cl[:k])}{', ...' if len(cl) > k else ''}]"
