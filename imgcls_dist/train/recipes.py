"""Recipes (configs/recipes/*.yaml: a training set-up for a kind of data, without data or architecture) and the
quick start that completes one into a whole config from a dataset and an architecture:

    imgcls-dist train --data DATASET --arch NAME [--recipe NAME] [--set KEY=VALUE ...]

The dataset's dataset.json decides what a user would otherwise look up: the recipe (small images, or photos
fine-tuned when the architecture's pretrained weights are in the cache, or photos from scratch), the image size
(small images: their own size; photos: the recipe's or the model's) and the channels (1 when every sampled
image is gray). Horizontal flips already follow dataset.json in every run.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from imgcls_dist.config import SHIPPED_CONFIGS, ExperimentConfig, build_config, read_yaml
from imgcls_dist.data.schema import read_dataset_meta
from imgcls_dist.errors import UserError
from imgcls_dist.models.registry import get_spec, weights_cached
from imgcls_dist.storage import location

RECIPES_DIR = SHIPPED_CONFIGS / "recipes"
SMALL, FINETUNE, SCRATCH = "small_images", "photos_finetune", "photos_scratch"
SMALL_MAX_SIDE = 64  # a dataset whose typical image is at most this many pixels a side is "small images"
SMALL_MIN_SIDE = 28  # ... and is trained at no less than this (8x8 scans upscaled: more room for the convs)


def list_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def recipe_path(name: str) -> Path:
    path = RECIPES_DIR / f"{name}.yaml"
    if not path.is_file():
        raise UserError(f"--recipe {name}: no such recipe; shipped: {', '.join(list_recipes())}")
    return path


def typical_side(meta: dict[str, Any]) -> int | None:
    """The longer side of the dataset's typical image: the ingested size of a built-in dataset, else the
    median of the images ingest sampled (None: a dataset ingested before ingest recorded it)."""
    images = meta.get("images") or {}
    if "median_height" in images:
        return max(images["median_height"], images["median_width"])
    return meta.get("image_size")


def choose_recipe(meta: dict[str, Any], arch: str) -> tuple[str, str]:
    """(recipe, why) for a dataset and an architecture."""
    side = typical_side(meta)
    if side is not None and side <= SMALL_MAX_SIDE:
        return SMALL, f"images of {side} px"
    cached = weights_cached(arch)
    if cached:
        return FINETUNE, f"photos, {arch}'s pretrained weights are in the cache"
    why = "has no pretrained weights" if cached is None else "pretrained weights are not in the cache"
    return SCRATCH, f"photos, {arch} {why}"


def quickstart_raw(data: str, arch: str, recipe: str | None = None) -> tuple[dict[str, Any], str, str]:
    """The recipe's config filled in for `data` and `arch`: (raw config, recipe name, why this recipe)."""
    meta = read_dataset_meta(data)
    spec = get_spec(arch)
    why = "asked for"
    if recipe is None:
        recipe, why = choose_recipe(meta, spec.name)
    raw = read_yaml(recipe_path(recipe))
    d = raw.setdefault("data", {})
    d["path"] = data
    d["in_channels"] = 1 if (meta.get("images") or {}).get("gray") else 3
    side = typical_side(meta)
    if d.get("image_size") is None:
        if recipe == SMALL and side is not None:
            d["image_size"] = max(min(side, SMALL_MAX_SIDE), SMALL_MIN_SIDE, spec.min_size)
        else:
            d["image_size"] = spec.default_size
    raw.setdefault("model", {})["arch"] = spec.name
    dataset = location(data).name or "data"
    raw.setdefault("run", {})["name"] = re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{spec.name}_{dataset}").strip(".-")
    return raw, recipe, why


def quickstart_config(data: str, arch: str, recipe: str | None = None,
                      overrides: list[str] | None = None) -> ExperimentConfig:
    """The whole config of a quick-start run; says which recipe it took and why."""
    raw, name, why = quickstart_raw(data, arch, recipe)
    print(f"recipe {name} ({why}): {recipe_path(name)}; image {raw['data']['image_size']} px, "
          f"{raw['data']['in_channels']} channel(s)", flush=True)
    return build_config(raw, overrides, source=f"recipe {name}")
