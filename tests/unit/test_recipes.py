"""Recipes and the quick start's choices (train/recipes.py), from dataset.json contents; the run itself:
tests/ray/test_quickstart.py."""

import json

import pytest
import yaml

from imgcls_dist.config import build_config
from imgcls_dist.errors import UserError
from imgcls_dist.models.registry import get_spec
from imgcls_dist.models.weights import cache_file, torchvision_models
from imgcls_dist.train import recipes as R


def _dataset(tmp_path, **meta):
    d = tmp_path / "shapes"
    d.mkdir(parents=True)
    (d / "dataset.json").write_text(json.dumps({"classes": ["a", "b"], **meta}))
    return str(d)


@pytest.fixture
def empty_hub(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    return tmp_path / "torch_home"


def test_every_shipped_recipe_is_a_valid_config_once_data_and_arch_are_given():
    assert set(R.list_recipes()) >= {R.SMALL, R.FINETUNE, R.SCRATCH}
    for name in R.list_recipes():
        raw = yaml.safe_load(R.recipe_path(name).read_text())
        assert "path" not in raw.get("data", {}) and "arch" not in raw.get("model", {})  # left to the user
        build_config(raw, ["data.path=d", "model.arch=resnet18"], source=name)


def test_small_images_take_their_own_size_within_bounds_and_gray_means_one_channel(tmp_path, empty_hub):
    data = _dataset(tmp_path, images={"median_height": 48, "median_width": 40, "gray": True})
    raw, recipe, why = R.quickstart_raw(data, "lenet5")
    assert recipe == R.SMALL and "48 px" in why
    assert raw["data"] == {**raw["data"], "path": data, "image_size": 48, "in_channels": 1}
    assert raw["model"]["arch"] == "lenet5" and raw["run"]["name"] == "lenet5_shapes"
    # 8x8 scans are trained at SMALL_MIN_SIDE; the built-in digits say their size as image_size
    tiny = _dataset(tmp_path / "t", image_size=8)
    assert R.quickstart_raw(tiny, "resnet18")[0]["data"]["image_size"] == R.SMALL_MIN_SIDE


def test_photos_fine_tune_only_when_the_weights_are_in_the_cache(tmp_path, empty_hub):
    data = _dataset(tmp_path, images={"median_height": 150, "median_width": 200, "gray": False})
    raw, recipe, why = R.quickstart_raw(data, "resnet18")
    assert recipe == R.SCRATCH and "not in the cache" in why
    assert raw["data"]["image_size"] == 96 and raw["data"]["in_channels"] == 3  # the recipe's size
    assert R.quickstart_raw(data, "lenet5")[1:] == (R.SCRATCH, "photos, lenet5 has no pretrained weights")
    spec = get_spec("resnet18")
    cached = cache_file(torchvision_models().get_model_weights("resnet18")[spec.default_weights])
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"")  # only its presence is looked at here
    raw, recipe, _ = R.quickstart_raw(data, "resnet18")
    assert recipe == R.FINETUNE and raw["data"]["image_size"] == spec.default_size == 224
    assert raw["model"]["weights"] == "DEFAULT"


def test_an_asked_recipe_wins_and_overrides_apply_last(tmp_path, empty_hub, capsys):
    data = _dataset(tmp_path, images={"median_height": 32, "median_width": 32, "gray": False})
    cfg = R.quickstart_config(data, "resnet18", "photos_scratch", ["train.epochs=3"])
    assert cfg.train.epochs == 3 and cfg.augment.preset == "strong" and cfg.data.image_size == 96
    assert "recipe photos_scratch (asked for)" in capsys.readouterr().out


def test_unknown_recipe_and_architecture_are_one_line_errors(tmp_path):
    data = _dataset(tmp_path, image_size=32)
    with pytest.raises(UserError, match="no such recipe; shipped: photos_finetune, photos_scratch, small_images"):
        R.quickstart_raw(data, "lenet5", "tiny")
    with pytest.raises(UserError, match="unknown model 'resnet181'"):
        R.quickstart_raw(data, "resnet181")
