"""`python -m benchmarks augment`: decode + augment images/s on one core, albumentations vs torchvision v2.

Both sides decode the same PNG bytes with our safe decoder (a shared cost) and then apply the closest
equivalent pipeline of each library; the ratio is albumentations / torchvision.
"""

from __future__ import annotations


import numpy as np
import torch

from benchmarks.common import items_per_second, machine, print_table
from imgcls_dist.data.augment import PRESETS, apply, build_torchvision_train_transform, build_train_transform
from imgcls_dist.data.builtin import digits_images, encode_png
from imgcls_dist.data.decode import decode_image


def bench_augment(image_size: int = 64, strength: float = 0.5, samples: int = 256, min_seconds: float = 2.0,
                  presets: tuple[str, ...] = PRESETS) -> dict:
    torch.set_num_threads(1)  # "per core": one DataLoader worker's view
    arrays, _, _ = digits_images(image_size)
    images = [encode_png(a) for a in arrays[:samples]]
    rows = []
    for preset in presets:
        alb = build_train_transform(preset, strength, image_size, hflip=True, seed=0)
        tv = build_torchvision_train_transform(preset, strength, image_size, hflip=True)

        def run_alb(b: bytes) -> np.ndarray:
            return apply(alb, decode_image(b).array)

        def run_tv(b: bytes) -> torch.Tensor:
            return tv(torch.from_numpy(decode_image(b).array).permute(2, 0, 1))

        a, t = items_per_second(run_alb, images, min_seconds), items_per_second(run_tv, images, min_seconds)
        rows.append({"preset": preset, "albumentations img/s": a, "torchvision img/s": t, "ratio alb/tv": a / t})
    print(f"bench augment: decode + augment, {image_size}px, strength {strength}, 1 thread — {machine()}")
    print_table(rows, ["preset", "albumentations img/s", "torchvision img/s", "ratio alb/tv"])
    return {"image_size": image_size, "strength": strength, "rows": rows, "machine": machine()}
