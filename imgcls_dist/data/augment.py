"""CPU-side image augmentation: albumentations presets scaled by one `strength` knob, MixUp/CutMix.

Every transform takes and returns uint8 HWC arrays of exactly image_size x image_size (normalization happens
later, on the device); strength 0 is the eval transform, except that the policy presets (torchvision's
TrivialAugmentWide, RandAugment, AugMix, inside the same albumentations pipeline) still run their policy.
Entry points: `build_train_transform`,
`build_eval_transform`, `build_batch_mix`, `reseed` (albumentations draws from its own RNGs: seeds come from
`data/seeds.py`). Design: docs/design.md, "Augmentation and reseeding".
"""

from __future__ import annotations

import math
import os
import random
from typing import TYPE_CHECKING, Any, Callable

# albumentations asks pypi.org for a newer release at every import (an HTTPS request, 2 s timeout): every
# Train worker, predictor actor and DataLoader process would phone out, and wait on clusters without internet.
# The check also slows every import (docs/benchmarks.md, "Process start-up"). A user's setting wins.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import albumentations as A  # noqa: E402
import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from imgcls_dist.data.presets import POLICY_PRESETS, PRESETS, AugmentSpec, scaled  # noqa: E402
from imgcls_dist.errors import UserError  # noqa: E402

if TYPE_CHECKING:
    from imgcls_dist.config import AugmentConfig
    from torchvision.transforms import v2 as T


def _validate(preset: str, strength: float, image_size: int) -> None:
    if preset not in PRESETS:
        raise UserError(f"augment.preset: unknown preset {preset!r}; valid values: {', '.join(PRESETS)}")
    if (
        isinstance(strength, bool)
        or not isinstance(strength, (int, float))
        or not math.isfinite(strength)
        or not 0.0 <= strength <= 1.0
    ):
        raise UserError(f"augment.strength: must be a number in [0, 1], got {strength!r}")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size <= 0:
        raise UserError(f"image_size: must be a positive integer, got {image_size!r}")


def _resize(image_size: int) -> A.Resize:
    # INTER_AREA when shrinking avoids aliasing (torchvision's antialias=True equivalent);
    # train and eval share this exact op so strength 0 reproduces eval bit-for-bit.
    return A.Resize(image_size, image_size, interpolation=cv2.INTER_LINEAR, area_for_downscale="image")


def build_eval_transform(image_size: int) -> A.Compose:
    """Deterministic resize (aspect ratio is not preserved) to ``image_size x image_size``."""
    _validate("none", 0.0, image_size)
    return A.Compose([_resize(image_size)])


def build_train_transform(
    preset: str,
    strength: float,
    image_size: int,
    hflip: bool = True,
    seed: int | None = None,
    erasing_p: float = 0.0,
    erasing_scale: tuple[float, float] = (0.02, 0.33),
    randaugment_n: int = 2,
    randaugment_m: int = 9,
    augmix_severity: int = 3,
) -> A.Compose:
    """Training transform for ``preset`` scaled by ``strength``; uint8 HWC in, uint8 HWC out.

    ``hflip=False`` removes the flip entirely (no other op, the policies' included, mirrors the image).
    ``seed`` seeds the whole pipeline from one shared generator (see ``reseed``).
    ``erasing_p`` > 0 ends it with random erasing (albumentations' Erasing, uniform-noise fill) of that
    probability, whatever the preset. A policy preset (presets.POLICY_PRESETS) is the "light" preset's crop and
    flip at ``strength`` followed by its torchvision policy, configured by the last three arguments.
    """
    _validate(preset, strength, image_size)
    ops = _preset_ops(scaled(preset, strength), image_size, hflip)
    if preset in POLICY_PRESETS:
        policy = torchvision_policy(preset, randaugment_n, randaugment_m, augmix_severity)
        ops.append(TorchvisionPolicy(policy, pil=POLICY_ON_PIL[preset]))
    if erasing_p > 0:
        ops.append(A.Erasing(scale=tuple(erasing_scale), ratio=(0.3, 3.3), fill="random_uniform", p=erasing_p))
    transform = A.Compose(ops)
    if seed is not None:
        reseed(transform, seed)
    return transform


def _preset_ops(mag: AugmentSpec, size: int, hflip: bool) -> list:
    """The albumentations ops of a preset's magnitudes ``mag`` (already scaled by strength)."""
    # Resize first, then crop the square: the crop at strength 0 is then exactly the eval
    # resize (a random crop on the raw, possibly non-square image could not be, since its
    # aspect-ratio range is absolute), and tiny inputs (8x8 digits) get sub-pixel crops.
    ops: list = [_resize(size)]
    if mag.crop_p > 0:
        r = 1.0 + mag.crop_ratio
        ops.append(A.RandomResizedCrop(
            size=(size, size), scale=(1.0 - mag.crop_area, 1.0), ratio=(1.0 / r, r),
            interpolation=cv2.INTER_LINEAR, p=mag.crop_p,
        ))
    if hflip and mag.flip_p > 0:
        ops.append(A.HorizontalFlip(p=mag.flip_p))
    if mag.affine_p > 0:
        ops.append(A.Affine(
            translate_percent=(-mag.shift, mag.shift),
            scale=(1.0 - mag.scale, 1.0 + mag.scale),
            rotate=(-mag.rotate, mag.rotate),
            # Edge-replicated border, as the TTA shift/zoom_out views do: a constant black border is a
            # new dark stroke on dark-on-white scans (digits), and reflecting duplicates strokes that
            # touch the edge. (torchvision's RandomAffine, the benchmark's baseline, only has fill.)
            border_mode=cv2.BORDER_REPLICATE, p=mag.affine_p,
        ))
    if mag.color_p > 0:
        ops.append(A.ColorJitter(
            brightness=mag.brightness, contrast=mag.contrast,
            saturation=mag.saturation, hue=mag.hue, p=mag.color_p,
        ))
    if mag.blur_noise_p > 0:
        sigma_max = max(0.1, mag.blur_sigma)
        noise_max = mag.noise_std
        ops.append(A.OneOf([
            A.GaussianBlur(blur_limit=0, sigma_limit=(0.1, sigma_max), p=1.0),
            A.GaussNoise(std_range=(noise_max / 2, noise_max), p=1.0),
        ], p=mag.blur_noise_p))
    if mag.dropout_p > 0:
        hole_max = mag.hole_size
        hole = (hole_max / 2, hole_max)
        ops.append(A.CoarseDropout(
            num_holes_range=(1, mag.max_holes),
            hole_height_range=hole, hole_width_range=hole, fill=0, p=mag.dropout_p,
        ))
    return ops


# Which input type each policy runs on in TorchvisionPolicy: the faster one as measured (its docstring).
POLICY_ON_PIL = {"trivialaugment": True, "randaugment": True, "augmix": False}


def torchvision_policy(preset: str, randaugment_n: int, randaugment_m: int, augmix_severity: int) -> T.Transform:
    """The torchvision.transforms.v2 policy of a policy preset (takes uint8 CHW tensors or PIL images)."""
    from torchvision.transforms import v2 as T  # lazy: decode workers never need torchvision

    # Bilinear, as torchvision's reference ImageNet recipes pass: the classes' default, nearest, leaves jagged
    # strokes when rotating or shearing 32 px digits. None of the three policies has a mirroring op.
    bilinear = T.InterpolationMode.BILINEAR
    if preset == "trivialaugment":
        return T.TrivialAugmentWide(interpolation=bilinear)
    if preset == "randaugment":
        return T.RandAugment(num_ops=randaugment_n, magnitude=randaugment_m, interpolation=bilinear)
    if preset == "augmix":
        return T.AugMix(severity=augmix_severity, interpolation=bilinear)
    raise ValueError(f"{preset!r} is not a policy preset")


class TorchvisionPolicy(A.ImageOnlyTransform):
    """A torchvision.transforms.v2 policy as an albumentations op, so it is seeded by ``reseed`` and pickles with
    the rest of the pipeline; uint8 HWC in and out, 1 or 3 channels.

    torchvision, because albumentations (2.0.8) has none of TrivialAugmentWide, RandAugment or AugMix. The
    input type is the faster one per policy (``pil``, from ``POLICY_ON_PIL``; docs/benchmarks.md, "Augmentation
    policies", one thread): PIL images for TrivialAugmentWide and RandAugment, whose PIL kernels ran 1.37-1.55x
    the images/s of the uint8-tensor ones at 32 px gray and 1.18-1.27x at 224 px RGB, conversions included;
    uint8 tensors (a zero-copy view of the array) for AugMix, which computes on tensors whatever it is given
    (1.04-1.2x PIL). All three take 1-channel input as it is (their saturation op leaves one channel
    unchanged), so gray images need no detour through 3 channels.
    """

    def __init__(self, policy: Callable[[Any], Any], pil: bool = False, p: float = 1.0):
        super().__init__(p=p)
        self.policy, self.pil = policy, pil

    def get_params(self) -> dict[str, Any]:
        # torchvision draws from torch's global generator: each image gets a seed from the generator the
        # Compose hands down (set_random_state), so a reseeded pipeline replays.
        return {"seed": int(self.random_generator.integers(2**63))}

    def apply(self, img: np.ndarray, seed: int = 0, **params: Any) -> np.ndarray:
        # Scoped: the caller's torch stream (dropout, MixUp in the same process) goes on as if nothing ran. By hand
        # rather than torch.random.fork_rng(devices=[]), which does the same but measured +14-24 us per image in
        # place against +2-7 us; the CPU generator's own manual_seed, not torch.manual_seed (+240-400 us: it seeds
        # every accelerator backend too) - docs/benchmarks.md, "Augmentation policies".
        generator = torch.default_generator
        state = generator.get_state()
        generator.manual_seed(seed)
        try:
            out = self._on_pil(img) if self.pil else self._on_tensor(img)
        finally:
            generator.set_state(state)
        return np.ascontiguousarray(out).reshape(img.shape)  # cv2 ops upstream may have dropped a 1-channel axis

    def _on_tensor(self, img: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(img.reshape(*img.shape[:2], -1)).permute(2, 0, 1)
        return self.policy(x).permute(1, 2, 0).numpy()

    def _on_pil(self, img: np.ndarray) -> np.ndarray:
        gray = img.ndim == 2 or img.shape[2] == 1
        # np.array, not asarray: PIL's buffer comes back read-only, and the collate step wants writable arrays
        return np.array(self.policy(Image.fromarray(img.reshape(img.shape[:2]) if gray else img)))


def train_transform_for(aug: AugmentConfig, image_size: int, hflip: bool, seed: int | None = None) -> A.Compose:
    """The training transform an `augment:` config section describes: every key of it passed on here, in one
    place, so no caller (the training loop, a benchmark's baseline) can leave one out."""
    return build_train_transform(aug.preset, aug.strength, image_size, hflip=hflip, seed=seed,
                                 erasing_p=aug.erasing_p, erasing_scale=aug.erasing_scale,
                                 randaugment_n=aug.randaugment_n, randaugment_m=aug.randaugment_m,
                                 augmix_severity=aug.augmix_severity)


def reseed(transform: A.BaseCompose, seed: int) -> None:
    """Reseed a built albumentations pipeline; identical seeds replay identical outputs.

    Deliberately not ``Compose.set_random_seed`` / ``Compose(seed=)``: in albumentations 2.0.8
    those give *every child* its own generator with the *same* seed, so e.g. the flip and the
    affine make the same apply/skip decision on every call. One shared generator keeps the
    ops independent.
    """
    if not isinstance(transform, A.BaseCompose):
        raise TypeError(f"reseed expects an albumentations Compose, got {type(transform).__name__}")
    transform.set_random_state(np.random.default_rng(seed), random.Random(seed))


def apply(transform: A.BaseCompose, image: np.ndarray) -> np.ndarray:
    """Run ``transform`` on one uint8 HWC image (HxW is treated as HxWx1); returns uint8 HWC."""
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3:
        raise ValueError(f"expected an HxWxC image, got shape {image.shape}")
    out = transform(image=image)["image"]
    if out.ndim == 2:  # some cv2 paths drop a trailing channel of size 1
        out = out[:, :, None]
    # torch.from_numpy rejects negative strides, and contiguous arrays collate faster
    return np.ascontiguousarray(out)


class BatchMix:
    """MixUp / CutMix on a float batch; always returns soft targets of shape (N, num_classes).

    A class rather than a closure so it pickles into Ray workers / dataloader processes.
    Randomness comes from torch's global RNG (as torchvision's MixUp/CutMix do).
    """

    def __init__(self, mixup_alpha: float, cutmix_alpha: float, prob: float, num_classes: int):
        from torchvision.transforms import v2 as T  # lazy: decode workers never need torchvision

        ops = []
        if mixup_alpha > 0:
            ops.append(T.MixUp(alpha=mixup_alpha, num_classes=num_classes))
        if cutmix_alpha > 0:
            ops.append(T.CutMix(alpha=cutmix_alpha, num_classes=num_classes))
        self.mix = ops[0] if len(ops) == 1 else T.RandomChoice(ops)
        self.prob = prob
        self.num_classes = num_classes

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.prob >= 1 or torch.rand(()).item() < self.prob:
            images, targets = self.mix(images, labels)
            return images, targets.float()
        # unmixed batches still get one-hot targets so the loss sees one format
        return images, torch.nn.functional.one_hot(labels, self.num_classes).to(images.dtype)


def build_batch_mix(
    mixup_alpha: float, cutmix_alpha: float, prob: float, num_classes: int
) -> Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None:
    """Batch-level MixUp/CutMix (random choice when both alphas > 0), applied with ``prob``.

    Returned callable: ``(images[N,C,H,W] float, labels[N] int64) -> (images, targets[N,K] float)``.
    None when there is nothing to mix (both alphas 0 or prob 0): the caller then uses hard labels.
    """
    if mixup_alpha < 0 or cutmix_alpha < 0:
        raise UserError("augment.mixup_alpha / augment.cutmix_alpha: must be >= 0")
    if not 0.0 <= prob <= 1.0:
        raise UserError(f"augment.mix_prob: must be in [0, 1], got {prob!r}")
    if (mixup_alpha == 0 and cutmix_alpha == 0) or prob == 0:
        return None
    return BatchMix(mixup_alpha, cutmix_alpha, prob, num_classes)


def build_torchvision_train_transform(
    preset: str, strength: float, image_size: int, hflip: bool = True,
    randaugment_n: int = 2, randaugment_m: int = 9, augmix_severity: int = 3,
) -> T.Compose:
    """Closest torchvision.transforms.v2 equivalent of ``build_train_transform`` (without erasing), on uint8
    CHW tensors; exists so the benchmark can compare images/s between the two libraries."""
    from torchvision.transforms import v2 as T

    _validate(preset, strength, image_size)
    mag = scaled(preset, strength)  # magnitudes and probabilities at this strength
    size = image_size
    ops: list = [T.Resize((size, size), antialias=True)]
    if mag.crop_p > 0:
        r = 1.0 + mag.crop_ratio
        crop = T.RandomResizedCrop(size, scale=(1.0 - mag.crop_area, 1.0), ratio=(1.0 / r, r))
        ops.append(T.RandomApply([crop], p=mag.crop_p))
    if hflip and mag.flip_p > 0:
        ops.append(T.RandomHorizontalFlip(p=mag.flip_p))
    if mag.affine_p > 0:
        affine = T.RandomAffine(
            degrees=mag.rotate, translate=(mag.shift, mag.shift),
            scale=(1.0 - mag.scale, 1.0 + mag.scale),
            interpolation=T.InterpolationMode.BILINEAR, fill=0,
        )
        ops.append(T.RandomApply([affine], p=mag.affine_p))
    if mag.color_p > 0:
        jitter = T.ColorJitter(
            brightness=mag.brightness, contrast=mag.contrast,
            saturation=mag.saturation, hue=mag.hue,
        )
        ops.append(T.RandomApply([jitter], p=mag.color_p))
    if mag.blur_noise_p > 0:
        sigma_max = max(0.1, mag.blur_sigma)
        kernel = 2 * math.ceil(3 * sigma_max) + 1
        blur_or_noise = T.RandomChoice([
            T.GaussianBlur(kernel, sigma=(0.1, sigma_max)),
            T.GaussianNoise(sigma=0.75 * mag.noise_std),  # middle of albumentations' range
        ])
        ops.append(T.RandomApply([blur_or_noise], p=mag.blur_noise_p))
    if mag.dropout_p > 0:
        # RandomErasing cuts one hole; area range matches one CoarseDropout hole
        hole_max = mag.hole_size
        ops.append(T.RandomErasing(p=mag.dropout_p, scale=((hole_max / 2) ** 2, hole_max**2), value=0))
    if preset in POLICY_PRESETS:
        ops.append(torchvision_policy(preset, randaugment_n, randaugment_m, augmix_severity))
    return T.Compose(ops)
