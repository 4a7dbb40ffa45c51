"""An ensemble of model files with test-time augmentation, as one callable on uint8 batches.

`EnsemblePredictor`: each member keeps its own input size, channels and mean/std (from its model file); all
views of a micro-batch go through one forward per member; members are combined by "mean", "weighted" or
"vote". Design: docs/design.md, "Combining members".
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from imgcls_dist.predictor.manifest import EnsembleSpec, resolve_combine
from imgcls_dist.errors import UserError
from imgcls_dist.predictor.device_feed import DeviceFeed
from imgcls_dist.predictor.backend import check_calibration, choose_runtime
from imgcls_dist.predictor.onnx_runtime import OrtForward, UInt8Logits
from imgcls_dist.predictor.precision import use_channels_last
from imgcls_dist.predictor.tta import apply_views, default_views, resolve_views
from imgcls_dist.models.registry import build_model_from_file
from imgcls_dist.predictor.options import BATCH_SIZE, CALIBRATION_ROWS

InputKey = tuple[int, int]  # (image_size, channels), as in predictor.prepare (not imported: it pulls albumentations)
VOTE_TIE_EPS = 1e-3


@dataclass
class Member:
    path: str
    model: torch.nn.Module
    meta: dict[str, Any]
    weight: float
    temperature: float = 1.0
    # uint8 [N, C, H, W] -> logits: the model behind its normalization, in torch or in ONNX Runtime (--backend)
    forward: Callable[[torch.Tensor], torch.Tensor] | None = None

    @property
    def key(self) -> InputKey:
        return (int(self.meta["image_size"]), int(self.meta["in_channels"]))


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


def pick_device(device: str | torch.device | None = None) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class EnsemblePredictor:
    """Loads each model once; `predict_uint8` maps uint8 batches to ensembled class probabilities.

    `batch_size` is images per forward before TTA: each forward holds batch_size * len(views) rows.
    `compile`: each member goes through `torch.compile` (inductor) with static shapes; a call's last, shorter
    micro-batch is padded to batch_size so that one graph per member serves every call (each new shape would
    otherwise compile again).
    `precision`: "auto", "fp32" or "bf16" (or "fp16" on CUDA), resolved for the device by
    `predictor.precision.choose_precision`: `precision` holds the result ("fp32", "bf16", "fp16"),
    `precision_choice` also why (its str is what a job's first line says: "precision bf16 (auto: CPU has ...)").
    `backend`: "torch", "onnxruntime" (CPU, fp32 or int8) or "auto" (`predictor.backend.choose_runtime` resolves it with
    the precision; `backend_choice` holds the result and why).
    `calibration`: with precision "int8" (CPU, ONNX Runtime), the dataset directory whose validation split's first
    CALIBRATION_ROWS images calibrate each member's quantization; required then, refused otherwise.
    """

    def __init__(
        self,
        model_paths: Sequence[str | Path],
        views: str | Sequence[str] | None = None,
        weights: Sequence[float] | None = None,
        combine: str | None = None,
        device: str | torch.device | None = None,
        batch_size: int = BATCH_SIZE,
        temperatures: Sequence[float] | None = None,
        compile: bool = False,
        precision: str = "auto",
        backend: str = "torch",
        calibration: str | Path | None = None,
    ):
        if not model_paths:
            raise UserError("no models given")
        if batch_size < 1:
            raise UserError(f"--batch-size: must be >= 1, got {batch_size}")
        self.combine = resolve_combine(combine, weights)
        self.weights = normalize_weights(weights, len(model_paths))
        self.temperatures = [1.0] * len(model_paths) if temperatures is None else [float(t) for t in temperatures]
        if len(self.temperatures) != len(model_paths) or any(not t > 0 for t in self.temperatures):
            raise UserError(f"temperatures: need one > 0 per model, got {list(temperatures or [])}")
        self.device = pick_device(device)
        self.batch_size = int(batch_size)
        self.backend_choice, self.precision_choice = choose_runtime(backend, precision, self.device)
        self.backend = self.backend_choice.backend
        check_calibration(self.precision_choice.precision, calibration)
        self.calibration = calibration
        self.precision = self.precision_choice.precision
        self.amp_dtype = self.precision_choice.amp_dtype
        self.channels_last = use_channels_last(self.precision, self.device)
        memory_format = torch.channels_last if self.channels_last else torch.preserve_format
        self.compiled = bool(compile)
        if self.compiled and self.backend != "torch":
            raise UserError(f"--compile: compiles torch models; the forward runs in {self.backend_choice}")
        self.feed = DeviceFeed(self.device, self.batch_size)
        self.members: list[Member] = []
        calibrations: dict[InputKey, np.ndarray] = {}  # int8: one read of the calibration images per input key
        for path, w, t in zip(model_paths, self.weights, self.temperatures):
            model, meta = build_model_from_file(path)
            if self.members and list(meta["classes"]) != list(self.members[0].meta["classes"]):
                first = self.members[0]
                raise UserError(
                    f"models disagree on classes: {first.meta['path']} has {_short(first.meta['classes'])}, "
                    f"{meta['path']} has {_short(meta['classes'])}"
                )
            member = Member(meta["path"], model.to(self.device, memory_format=memory_format).eval(), meta, w, t)
            member.forward = self._forward(member, calibrations)
            self.members.append(member)
        self.classes: list[str] = list(self.members[0].meta["classes"])
        self.hflip_ok = all(bool(m.meta.get("hflip", True)) for m in self.members)
        self.views = resolve_views(views, self.hflip_ok, default_views([m.meta for m in self.members]))

    def _forward(self, m: Member, calibrations: dict[InputKey, np.ndarray]) -> Callable[[torch.Tensor], torch.Tensor]:
        logits = UInt8Logits(m.model, m.meta["mean"], m.meta["std"], channels_last=self.channels_last).eval()
        if self.backend != "onnxruntime":
            return torch.compile(logits, dynamic=False) if self.compiled else logits
        if self.calibration is not None and m.key not in calibrations:
            from imgcls_dist.predictor.prepare import calibration_images  # albumentations: int8 runs only

            calibrations[m.key] = calibration_images(self.calibration, m.key, CALIBRATION_ROWS)
        return OrtForward(logits, m.key, m.path, calibrations.get(m.key))

    @classmethod
    def from_spec(cls, spec: EnsembleSpec, views: str | Sequence[str] | None = None, **kw) -> EnsemblePredictor:
        """A predictor for an EnsembleSpec; `views` (--tta) None -> the manifest's views, else the default."""
        return cls(spec.paths, views=views if views is not None else spec.views, weights=spec.weights,
                   combine=spec.combine, temperatures=spec.temperatures, **kw)

    @property
    def input_keys(self) -> list[InputKey]:
        return sorted({m.key for m in self.members})

    def describe(self) -> list[dict[str, Any]]:
        """Plain-typed member summary for manifests and logs."""
        return [
            {"path": m.path, "arch": m.meta["arch"], "image_size": m.key[0], "in_channels": m.key[1],
             "weight": m.weight, "temperature": m.temperature, "metrics": m.meta.get("metrics", {})}
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
        batches = self._batches(images)
        n = len(batches[self.input_keys[0]])
        # Results stay on the device until the call ends: one device-to-host copy, no sync per micro-batch.
        out = torch.empty((n, len(self.classes)), dtype=torch.float32, device=self.device)
        per_member = [torch.empty_like(out) for _ in self.members] if return_members else []
        for sl, xs in self.feed(batches, n):
            probs = [self._member_probs(m, xs[m.key]) for m in self.members]
            out[sl] = self._combine(probs)
            for dst, p in zip(per_member, probs):
                dst[sl] = p
        if return_members:
            return out.cpu().numpy(), [p.cpu().numpy() for p in per_member]
        return out.cpu().numpy()

    def view_logits(self, images: dict[InputKey, torch.Tensor | np.ndarray]) -> np.ndarray:
        """Raw logits of every member and view, [M, V, N, num_classes] float32 (no temperature): what
        `ensemble build` fits temperatures, weights and views on."""
        batches = self._batches(images)
        n = len(batches[self.input_keys[0]])
        out = torch.empty((len(self.members), len(self.views), n, len(self.classes)), dtype=torch.float32,
                          device=self.device)
        for sl, xs in self.feed(batches, n):
            for i, m in enumerate(self.members):
                out[i, :, sl] = self._logits(m, xs[m.key])
        return out.cpu().numpy()

    def _batches(self, images: dict[InputKey, torch.Tensor | np.ndarray]) -> dict[InputKey, torch.Tensor]:
        batches = {((k, 3) if isinstance(k, int) else tuple(k)): _as_nchw(v) for k, v in images.items()}
        missing = [k for k in self.input_keys if k not in batches]
        if missing:
            raise ValueError(f"predict_uint8: no input for member keys {missing} (have {sorted(batches)})")
        return batches

    def _logits(self, m: Member, x: torch.Tensor) -> torch.Tensor:
        """[N,C,H,W] uint8 on the device -> [V, N, num_classes] float32 logits on the device."""
        n = x.shape[0]
        if self.compiled and n < self.batch_size:
            x = torch.cat([x, x.new_zeros((self.batch_size - n, *x.shape[1:]))])
        amp = torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype else nullcontext()
        with torch.inference_mode(), amp:
            return m.forward(apply_views(x, self.views)).float().view(len(self.views), x.shape[0], -1)[:, :n]

    def _member_probs(self, m: Member, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return (self._logits(m, x) / m.temperature).softmax(dim=-1).mean(dim=0)

    def _combine(self, probs: list[torch.Tensor]) -> torch.Tensor:
        w = torch.tensor(self.weights, dtype=torch.float32, device=probs[0].device).view(-1, 1, 1)
        stacked = torch.stack(probs)  # [M, N, C]
        soft = (stacked * w).sum(dim=0)
        if self.combine != "vote":
            return soft
        votes = torch.zeros_like(soft)
        for p, wi in zip(probs, self.weights):
            votes[torch.arange(p.shape[0], device=p.device), p.argmax(dim=-1)] += wi
        return (votes + VOTE_TIE_EPS * soft) / (1.0 + VOTE_TIE_EPS)


def _as_nchw(x: torch.Tensor | np.ndarray) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2)
    return x


def _short(classes: Sequence[str], k: int = 6) -> str:
    cl = list(classes)
    return f"{len(cl)} classes [{', '.join(cl[:k])}{', ...' if len(cl) > k else ''}]"
