"""Augmentation presets as plain tables of magnitudes at strength 1 (no image library imported).

`data.augment` builds the albumentations / torchvision pipelines from these; `predictor.tta` reads them
to decide which test-time views a model saw during training.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, get_args

from imgcls_dist.config import AugmentConfig, Preset

PRESETS = get_args(Preset)


@dataclass(frozen=True)
class AugmentSpec:
    """Magnitudes at strength 1. Zero disables a component."""

    crop_area: float = 0.0  # crop keeps [1 - crop_area, 1] of the (resized) image area
    crop_ratio: float = 0.0  # crop aspect ratio in [1 / (1 + r), 1 + r]
    crop_p: float = 0.0
    flip_p: float = 0.0
    shift: float = 0.0  # fraction of side, +-
    scale: float = 0.0  # zoom 1 +- scale
    rotate: float = 0.0  # degrees, +-
    affine_p: float = 0.0
    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0
    hue: float = 0.0
    color_p: float = 0.0
    blur_sigma: float = 0.0  # max gaussian-blur sigma, pixels
    noise_std: float = 0.0  # max gaussian-noise std, fraction of 255
    blur_noise_p: float = 0.0
    max_holes: int = 0
    hole_size: float = 0.0  # max hole side, fraction of image side
    dropout_p: float = 0.0


SPECS: dict[str, AugmentSpec] = {
    "none": AugmentSpec(),
    "light": AugmentSpec(
        crop_area=0.15, crop_ratio=0.1, crop_p=1.0, flip_p=0.5,
        brightness=0.1, contrast=0.1, color_p=0.5,
    ),
    "standard": AugmentSpec(
        crop_area=0.5, crop_ratio=1 / 3, crop_p=1.0, flip_p=0.5,
        shift=0.0625, scale=0.1, rotate=15.0, affine_p=0.5,
        brightness=0.3, contrast=0.3, saturation=0.3, hue=0.05, color_p=0.8,
    ),
    "strong": AugmentSpec(
        crop_area=0.75, crop_ratio=1 / 3, crop_p=1.0, flip_p=0.5,
        shift=0.1, scale=0.2, rotate=30.0, affine_p=0.7,
        brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1, color_p=0.8,
        blur_sigma=1.5, noise_std=0.08, blur_noise_p=0.3,
        max_holes=4, hole_size=0.25, dropout_p=0.5,
    ),
}


# The policy presets: torchvision.transforms.v2's automatic augmentation policies (albumentations has none), run
# after POLICY_BASE's geometry. Value: the largest translation the policy draws, as a fraction of the side, from
# the augment config (torchvision's magnitude tables; `predictor.tta` compares it with its shift view):
# TrivialAugmentWide up to 32 px whatever the side, so at least 1/32 of any side up to data.image_size's
# maximum (1024); RandAugment exactly 150/331 of the side x M/30; AugMix up to 1/3 of the side x (severity - 1)/9.
POLICY_PRESETS: dict[str, Callable[[dict[str, Any]], float]] = {
    "trivialaugment": lambda aug: 32 / 1024,
    "randaugment": lambda aug: 150 / 331 * _policy_key(aug, "randaugment_m") / 30,
    "augmix": lambda aug: (_policy_key(aug, "augmix_severity") - 1) / 9 / 3,
}
# The policies bring their own colour and geometry ops; of this preset they keep the crop and the flip, so that
# augment.strength still scales something and augment.hflip still decides on mirroring.
POLICY_BASE = "light"


def _policy_key(aug: dict[str, Any], key: str) -> int:
    # A model file written before the key existed trained with its default.
    return int(aug.get(key, AugmentConfig.model_fields[key].default))


def _geometry(spec: AugmentSpec) -> AugmentSpec:
    return AugmentSpec(crop_area=spec.crop_area, crop_ratio=spec.crop_ratio, crop_p=spec.crop_p, flip_p=spec.flip_p)


SPECS.update({name: _geometry(SPECS[POLICY_BASE]) for name in POLICY_PRESETS})


def policy_max_shift(aug: dict[str, Any]) -> float:
    """Largest translation (fraction of the side) the policy of augment config `aug` draws; 0 without a policy."""
    policy = POLICY_PRESETS.get(aug.get("preset"))
    return policy(aug) if policy else 0.0


def scaled(preset: str, strength: float) -> AugmentSpec:
    """The preset's magnitudes and probabilities multiplied by `strength` (what training applies)."""
    spec, s = SPECS[preset], float(strength)
    values = {f: getattr(spec, f) * s for f in spec.__dataclass_fields__ if f != "max_holes"}
    return replace(spec, **values, max_holes=max(1, round(spec.max_holes * s)) if spec.max_holes else 0)
