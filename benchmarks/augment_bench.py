"""`python -m benchmarks augment`: decode + augment images/s on one core, albumentations vs torchvision v2.

Both sides decode the same PNG bytes with our safe decoder (a shared cost) and then apply the closest
equivalent pipeline of each library; the ratio is albumentations / torchvision.

`--policies`: the torchvision policies of the policy presets alone, on 32 px gray and 224 px RGB arrays: on
uint8 tensors vs on PIL images (array in, array out on both sides), and as our pipeline runs them
(`TorchvisionPolicy`: the input type `POLICY_ON_PIL` picks, seeded per image in a scoped torch RNG); then what
each way of seeding costs around the same policy calls. Times are CPU time of the one thread, so that the
neighbours' load on a shared machine counts less.
"""

from __future__ import annotations

import time
from typing import Callable

import cv2
import numpy as np
import torch
from PIL import Image

from benchmarks.common import items_per_second, machine, print_table
from imgcls_dist.data.augment import (POLICY_ON_PIL, PRESETS, TorchvisionPolicy, apply,
                                      build_torchvision_train_transform, build_train_transform, torchvision_policy)
from imgcls_dist.data.builtin import digits_images, encode_png
from imgcls_dist.data.decode import decode_image
from imgcls_dist.data.presets import POLICY_PRESETS

POLICY_INPUTS = (("32 px gray", 32, 1), ("224 px RGB", 224, 3))


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


def _single_thread() -> None:
    # one DataLoader process's view (train/data.py's worker init; cv2 0 = no threading)
    torch.set_num_threads(1)
    cv2.setNumThreads(0)


def _policy_images(size: int, channels: int, samples: int) -> list[np.ndarray]:
    arrays, _, _ = digits_images(size)
    if channels == 1:
        return [np.ascontiguousarray(a[:, :, :1]) for a in arrays[:samples]]
    tint = np.array([1.0, 0.8, 0.6])  # unequal channels, so the colour ops have colour to change
    return [(a * tint).astype(np.uint8) for a in arrays[:samples]]


def _on_tensor(policy) -> Callable[[np.ndarray], np.ndarray]:
    def run(a: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(policy(torch.from_numpy(a).permute(2, 0, 1)).permute(1, 2, 0).numpy())
    return run


def _on_pil(policy) -> Callable[[np.ndarray], np.ndarray]:
    def run(a: np.ndarray) -> np.ndarray:
        return np.asarray(policy(Image.fromarray(a[:, :, 0] if a.shape[2] == 1 else a)))
    return run


def _seeded_arms(policy, pil: bool, seeds: list[int]) -> dict[str, Callable[[int, np.ndarray], object]]:
    """(k, image) -> output, each arm seeding torch with seeds[k] its own way around the same policy call."""
    op = TorchvisionPolicy(policy, pil=pil)
    bare, g = (_on_pil if pil else _on_tensor)(policy), torch.default_generator

    def cpu_seed(k, a):
        g.manual_seed(seeds[k])
        return bare(a)

    def global_seed(k, a):
        torch.manual_seed(seeds[k])
        return bare(a)

    def fork_rng(k, a):
        with torch.random.fork_rng(devices=[]):
            g.manual_seed(seeds[k])
            return bare(a)

    def get_set_state(k, a):
        state = g.get_state()
        g.manual_seed(seeds[k])
        try:
            return bare(a)
        finally:
            g.set_state(state)

    return {"CPU generator seed, unscoped": cpu_seed, "torch.manual_seed, unscoped": global_seed,
            "fork_rng + CPU seed": fork_rng, "get/set_state + CPU seed": get_set_state,
            "TorchvisionPolicy": lambda k, a: op.apply(a, seed=seeds[k])}


def _best_cpu_us(arms: dict[str, Callable[[int, np.ndarray], object]], images: list[np.ndarray], calls: int,
                 rounds: int) -> dict[str, float]:
    """{arm: CPU us per call}, best of alternating rounds (a busy neighbour slows some rounds of every arm)."""
    best = dict.fromkeys(arms, float("inf"))
    for r in range(rounds):
        for name, fn in arms.items():
            torch.default_generator.manual_seed(r)  # the unseeded arms draw the same ops
            t0 = time.thread_time()
            for k in range(calls):
                fn(k, images[k % len(images)])
            best[name] = min(best[name], (time.thread_time() - t0) / calls * 1e6)
    return best


def _policy_row(label: str, preset: str, images: list[np.ndarray], rounds: int, seconds: float) -> tuple[dict, dict]:
    policy, pil = torchvision_policy(preset, 2, 9, 3), POLICY_ON_PIL[preset]  # the config defaults
    on_tensor, on_pil = _on_tensor(policy), _on_pil(policy)
    one_pass = _best_cpu_us({"": lambda k, a: on_tensor(a)}, images, len(images), 1)[""]
    calls = len(images) * max(1, round(seconds * 1e6 / one_pass / len(images)))  # ~`seconds` per arm and round
    seeds = [int(x) for x in np.random.default_rng(0).integers(2**63, size=calls)]
    us = _best_cpu_us({"tensor": lambda k, a: on_tensor(a), "PIL": lambda k, a: on_pil(a),
                       **_seeded_arms(policy, pil, seeds)}, images, calls, rounds)
    wrapped = us["TorchvisionPolicy"]
    row = {"input": label, "policy": preset, "tensor img/s": 1e6 / us["tensor"], "PIL img/s": 1e6 / us["PIL"],
           "ratio PIL/tensor": us["tensor"] / us["PIL"], "pipeline runs": "PIL" if pil else "tensor",
           "TorchvisionPolicy img/s": 1e6 / wrapped, "ratio wrapped/bare": us["PIL" if pil else "tensor"] / wrapped}
    base = us["CPU generator seed, unscoped"]
    seeding = {"input": label, "policy": preset, "us/img, CPU seed unscoped": base,
               **{f"+us {k}": us[k] - base for k in list(us)[3:]}}  # the arms after it
    return row, seeding


def bench_policies(rounds: int = 5, seconds: float = 0.5, samples: int = 64) -> dict:
    _single_thread()
    rows, seeding = [], []
    for label, size, channels in POLICY_INPUTS:
        images = _policy_images(size, channels, samples)
        for preset in POLICY_PRESETS:
            row, seed_row = _policy_row(label, preset, images, rounds, seconds)
            rows.append(row)
            seeding.append(seed_row)
    print(f"bench augment --policies: torchvision policy alone, 1 thread, CPU time, best of {rounds} rounds — "
          f"{machine()}")
    print_table(rows, list(rows[0]))
    print("seeding torch per image around the same policy calls and seeds, extra us over the unscoped CPU seed "
          "(TorchvisionPolicy: get/set_state + its array copies):")
    print_table(seeding, list(seeding[0]))
    return {"rows": rows, "seeding": seeding, "machine": machine()}
