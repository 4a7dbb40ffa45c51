"""Knowledge distillation (`train.teacher`): a validated ensemble (ensemble.json, with its temperatures, weights
and test-time views) or a model file gives soft targets for the very images the student trains on.

The teacher runs inside each Train worker on the worker's batch, after augmentation and MixUp/CutMix: the
student is taught what the teacher says about the augmented image it sees, which a pass that precomputes
targets once per image (Ray Data) cannot give, since every epoch augments every image anew. The cost is one
teacher forward per student step (docs/benchmarks.md, "Distillation", measures it).

Loss (Hinton et al. 2015): `alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(student, labels)`, where
`x_T` is a softmax at temperature T. The teacher gives probabilities (an ensemble's combined ones), so its
tempered distribution is `softmax(log p / T)`; T^2 keeps the soft term's gradients on the scale of the hard
one's. Hand-written: neither torch, accelerate nor timm ships a distillation loss for a custom loop.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from imgcls_dist.errors import UserError
from imgcls_dist.models.checkpoint import load_model_file
from imgcls_dist.predictor.manifest import resolve_ensemble
from imgcls_dist.predictor.predictor import EnsemblePredictor

_EPS = 1e-8  # teacher probabilities are floored before the log: an ensemble can say exactly 0


def check_teacher(path: str, classes: list[str]) -> None:
    """Before any worker starts: the teacher resolves (manifest or model file, on any filesystem) and knows
    exactly the dataset's classes, in order."""
    try:
        teacher_classes = load_model_file(resolve_ensemble(path).paths[0])["classes"]
    except UserError as e:
        raise UserError(f"train.teacher: {e}") from None
    if list(teacher_classes) != list(classes):
        raise UserError(f"train.teacher: {path} predicts the classes {_short(teacher_classes)}, the dataset has "
                        f"{_short(classes)}: a teacher must know exactly the student's classes, in the same order")


def _short(names) -> str:
    names = list(names)
    return ", ".join(names[:6]) + (f" ... ({len(names)})" if len(names) > 6 else "")


def distillation_loss(logits: torch.Tensor, targets: torch.Tensor, teacher_probs: torch.Tensor, *,
                      temperature: float, alpha: float, weight: torch.Tensor | None = None,
                      label_smoothing: float = 0.0) -> torch.Tensor:
    """`targets`: class indices or (MixUp/CutMix) class distributions, as F.cross_entropy takes them."""
    hard = F.cross_entropy(logits, targets, weight=weight, label_smoothing=label_smoothing)
    soft_teacher = F.softmax(teacher_probs.clamp_min(_EPS).log() / temperature, dim=1)
    kd = F.kl_div(F.log_softmax(logits / temperature, dim=1), soft_teacher, reduction="batchmean")
    return alpha * temperature**2 * kd + (1 - alpha) * hard


class Teacher:
    """The ensemble behind `train.teacher`, on the worker's device, answering for uint8 student batches."""

    def __init__(self, path: str, device: torch.device):
        self.predictor = EnsemblePredictor.from_spec(resolve_ensemble(path), device=device)

    @torch.no_grad()
    def probs(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [N,C,H,W] (the student's size and channels) -> the ensemble's probabilities [N, classes], each
        member fed at its own input size and channels."""
        inputs = {key: _as_input(images, *key) for key in self.predictor.input_keys}
        return torch.from_numpy(self.predictor.predict_uint8(inputs)).to(images.device)


def _as_input(images: torch.Tensor, size: int, channels: int) -> torch.Tensor:
    x = images
    if x.shape[1] != channels:  # 1 -> 3: replicate; 3 -> 1: the mean (what a gray decode of the file would be)
        x = x.expand(-1, 3, -1, -1) if channels == 3 else x.float().mean(dim=1, keepdim=True).round().to(torch.uint8)
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        x = x.round().clamp(0, 255).to(torch.uint8)
    return x.contiguous()
