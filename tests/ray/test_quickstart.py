"""The quick start as a new user runs it: a tree of 200x150 JPEGs in three classes, ingested, then
`imgcls-dist train --data DATASET --arch NAME` without a config file (on the suite's shared Ray)."""

from __future__ import annotations

import json

import pytest
import yaml

from imgcls_dist.cli import main
from imgcls_dist.data.builtin import digits_images
from imgcls_dist.data.ingest import ingest
from imgcls_dist.data.shards import read_rows
from imgcls_dist.data.synthetic import photo_jpeg

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def photo_tree(tmp_path_factory):
    """30 photo-like JPEGs (a digit on a textured background) per class: 0, 1 and 7."""
    images, labels, _ = digits_images(32)
    src = tmp_path_factory.mktemp("photos") / "src"
    for digit, name in ((0, "zero"), (1, "one"), (7, "seven")):
        (src / name).mkdir(parents=True)
        for k, i in enumerate([i for i, y in enumerate(labels) if y == digit][:30]):
            (src / name / f"{k:03d}.jpg").write_bytes(photo_jpeg(images[i], 200, 150, seed=k))
    return src


def test_ingest_records_the_typical_image_and_the_quick_start_trains_from_it(ray_session, photo_tree, tmp_path,
                                                                            monkeypatch, capsys,
                                                                            fresh_accelerate_state):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # no cached weights: the scratch recipe
    data = tmp_path / "photos3"
    meta = ingest(str(photo_tree), data, fractions=(0.6, 0.2, 0.2), seed=0, verbose=False)
    assert meta["images"] == {"median_height": 150, "median_width": 200, "gray": False, "sampled": 90}
    # rows are not in path order (grouped by class): a worker's share of a small split sees every class
    labels = read_rows(sorted((data / "train").glob("*.parquet"))).labels
    changes = int((labels[1:] != labels[:-1]).sum())
    assert changes > 10 and set(labels[: len(labels) // 2]) == {0, 1, 2}
    # the test keeps it short; every other choice is the recipe's
    rc = main(["train", "--data", str(data), "--arch", "resnet18", "--set", f"run.storage_path={tmp_path / 'runs'}",
               "--set", "train.epochs=3", "--set", "train.min_steps=null", "--set", "data.image_size=48"])
    out, err = capsys.readouterr()
    assert rc == 0, err[-2000:]
    assert "recipe photos_scratch (photos, resnet18 pretrained weights are not in the cache)" in out
    run = tmp_path / "runs" / "resnet18_photos3"
    assert f"resolved config: {run / 'config.yaml'}" in out and "test accuracy" in out
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["data"]["in_channels"] == 3 and cfg["data"]["image_size"] == 48
    assert cfg["augment"]["preset"] == "strong" and cfg["train"]["early_stop_patience"] == 6
    assert cfg["train"]["precise_bn_batches"] == 8  # run before every validation (train/precise_bn.py)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["epochs"] == 3 and 0.0 <= summary["test_acc"] <= 1.0


def test_the_built_in_digits_say_they_are_gray_and_small(tmp_path):
    meta = ingest("builtin:digits", tmp_path / "d", image_size=16, verbose=False)
    assert meta["images"] == {"median_height": 16, "median_width": 16, "gray": True, "sampled": 1797}
    assert "gray" not in meta
