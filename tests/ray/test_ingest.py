"""`ingest` of image trees through Ray tasks: ImageFolder and pre-split layouts, errors before any write,
progress on the console, and s3:// in and out."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from helpers.digit_trees import image_tree

from imgcls_dist.cli import main
from imgcls_dist.data.builtin import digits_images
from imgcls_dist.data.ingest import ingest
from imgcls_dist.data.schema import SPLITS, validate_dataset
from imgcls_dist.data.shards import read_rows
from imgcls_dist.errors import UserError
from imgcls_dist.storage import location


def test_a_few_thousand_files_ingest_in_parallel_ray_tasks(ray_session, tmp_path, capsys):
    src = tmp_path / "src"
    n = image_tree(src, per_class=170, classes=tuple(str(i) for i in range(10)))  # 1,700 files
    (src / "3" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (src / "notes.txt").write_text("not an image")
    meta = ingest(str(src), tmp_path / "out", rows_per_shard=150, fractions=(0.7, 0.15, 0.15))
    out = capsys.readouterr().out
    assert "ingest: " in out and f"{n + 1:,}/{n + 1:,} files (1 skipped)" in out  # the final progress line
    assert meta["ingest"]["worker_processes"] > 1, meta["ingest"]  # the reading ran in several Ray workers
    assert meta["ingest"]["shards"] >= 12
    assert sum(meta["counts"].values()) == n and len(meta["skipped"]) == 1 and "broken.png" in meta["skipped"][0]
    assert meta["classes"] == [str(i) for i in range(10)] and meta["layout"] == "split by ingest"
    ds = validate_dataset(tmp_path / "out")
    ids = {s: read_rows(ds["files"][s]).ids for s in SPLITS}
    assert sum(len(v) for v in ids.values()) == n == len(set().union(*ids.values()))
    for s in SPLITS:  # stratified: every class in every split, in proportion
        frac = np.bincount(read_rows(ds["files"][s]).labels, minlength=10) / len(ids[s])
        assert np.all(np.abs(frac - 0.1) < 0.02), (s, frac)
    assert all(i.split("/")[0] == i.split("/")[1].split("_")[0] for i in ids["train"])  # id = path, label = folder


def test_pre_split_tree_keeps_its_splits(ray_session, tmp_path):
    src = tmp_path / "src"
    image_tree(src, per_class=20, splits={"train": 0.6, "valid": 0.2, "test": 0.2})
    meta = ingest(str(src), tmp_path / "out", fractions=(0.9, 0.1, 0.0), verbose=False)  # fractions ignored
    assert meta["layout"] == "pre-split" and meta["classes"] == ["0", "1", "2"]
    assert meta["counts"] == {"train": 36, "val": 12, "test": 12}
    ds = validate_dataset(tmp_path / "out")
    for split, folder in (("train", "train"), ("val", "valid"), ("test", "test")):
        rows = read_rows(ds["files"][split])
        assert all(i.startswith(f"{folder}/") for i in rows.ids), split
        assert [meta["classes"][k] for k in rows.labels] == [i.split("/")[1] for i in rows.ids]


def test_classes_keeps_only_those_of_a_pre_split_tree_relabelled(ray_session, tmp_path):
    src = tmp_path / "src"
    image_tree(src, per_class=10, splits={"train": 0.6, "val": 0.2, "test": 0.2}, classes=("0", "1", "2", "3"))
    meta = ingest(str(src), tmp_path / "out", verbose=False, classes=["3", "1"])
    assert meta["classes"] == ["1", "3"] and meta["counts"] == {"train": 12, "val": 4, "test": 4}
    rows = read_rows(validate_dataset(tmp_path / "out")["files"]["train"])
    assert [meta["classes"][k] for k in rows.labels] == [i.split("/")[1] for i in rows.ids]


def test_classes_of_the_builtin_digits_make_disjoint_source_and_target(tmp_path, capsys):
    for name, classes in (("low", "0,1,2,3,4"), ("high", "5,6,7,8,9")):
        assert main(["ingest", "builtin:digits", str(tmp_path / name), "--image-size", "8",
                     "--classes", classes]) == 0
    low, high = (json.loads((tmp_path / n / "dataset.json").read_text()) for n in ("low", "high"))
    assert low["classes"] == list("01234") and high["classes"] == list("56789")
    all_digits = np.bincount(digits_images(8)[1], minlength=10)
    assert sum(high["counts"].values()) == all_digits[5:].sum()
    ds = validate_dataset(tmp_path / "high")
    assert set(read_rows(ds["files"]["test"]).labels.tolist()) == set(range(5))
    assert main(["ingest", "builtin:digits", str(tmp_path / "low"), "--overwrite", "--classes", "4,x"]) == 2
    assert "--classes: 'x' not a class of builtin:digits (classes: 0, 1," in capsys.readouterr().err
    assert json.loads((tmp_path / "low" / "dataset.json").read_text())["classes"] == list("01234")  # kept


@pytest.mark.parametrize("layout, message", [
    ({"train/0": 2, "train/1": 2, "val/0": 1, "val/7": 1}, "class '7' is in val/ but missing from train/"),
    ({"train/0": 2, "cats": 2}, "split folders (train) beside other folders (cats)"),
    ({"val/0": 2, "test/0": 2}, "needs a train/ folder"),
    ({"val/0": 2, "validation/0": 2, "train/0": 2}, "val and validation are both the val split"),
])
def test_bad_trees_fail_before_anything_is_written(tmp_path, layout, message, capsys):
    src = tmp_path / "src"
    images, _, _ = digits_images(8)
    for folder, count in layout.items():
        (src / folder).mkdir(parents=True)
        for i in range(count):
            Image.fromarray(images[i]).save(src / folder / f"{i}.png")
    assert main(["ingest", str(src), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_failed_ingest_keeps_the_existing_dataset(ray_session, tmp_path):
    ingest("builtin:digits", tmp_path / "d", image_size=8)
    before = (tmp_path / "d" / "dataset.json").read_text()
    with pytest.raises(UserError, match="no images in class folders"):
        (tmp_path / "empty").mkdir()
        ingest(str(tmp_path / "empty"), tmp_path / "d", overwrite=True)
    assert (tmp_path / "d" / "dataset.json").read_text() == before


def test_s3_tree_to_s3_dataset(ray_session, s3, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bucket = s3.bucket()
    local = tmp_path / "photos"
    image_tree(local, per_class=12, splits={"train": 0.5, "val": 0.25, "test": 0.25})
    location(f"{bucket}/photos").upload(local)
    assert main(["ingest", f"{bucket}/photos", f"{bucket}/data", "--rows-per-shard", "5"]) == 0
    meta = json.loads(location(f"{bucket}/data/dataset.json").read_text())
    assert meta["source"] == f"{bucket}/photos" and meta["counts"] == {"train": 18, "val": 9, "test": 9}
    ds = validate_dataset(f"{bucket}/data")
    assert [f.name for f in ds["files"]["train"]] == [f"part-{i:05d}.parquet" for i in range(4)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos"]  # nothing else appeared locally

    assert main(["ingest", "builtin:digits", f"{bucket}/digits", "--image-size", "8"]) == 0
    assert validate_dataset(f"{bucket}/digits")["rows"]["train"] > 1000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos"]  # no local 's3:' directory
