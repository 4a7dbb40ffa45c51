import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from imgcls_dist.cli import main
from imgcls_dist.data.decode import decode_image
from imgcls_dist.data.ingest import ingest
from imgcls_dist.data.schema import SPLITS, list_parquet, validate_dataset, validate_files
from imgcls_dist.data.shards import read_rows, write_shards
from imgcls_dist.errors import UserError


def test_builtin_digits_layout_and_schema(digits_dir):
    meta = json.loads((digits_dir / "dataset.json").read_text())
    assert meta["classes"] == [str(i) for i in range(10)]
    assert sum(meta["counts"].values()) == 1797
    assert meta["hflip"] is False
    for split in SPLITS:
        files = sorted((digits_dir / split).glob("*.parquet"))
        assert files
        t = pq.read_table(files[0])
        assert t.schema.field("id").type == pa.string()
        assert t.schema.field("image").type == pa.binary()
        assert t.schema.field("label").type == pa.int64()
        assert max(pq.read_metadata(f).num_rows for f in files) <= 300
        assert sum(pq.read_metadata(f).num_rows for f in files) == meta["counts"][split]
    # Encoded files, not arrays: the first bytes are a PNG signature and decode to the ingest size.
    img = pq.read_table(files[0]).column("image")[0].as_py()
    assert img[:8] == b"\x89PNG\r\n\x1a\n"
    assert decode_image(img).array.shape == (32, 32, 3)


def test_split_is_stratified_and_disjoint(digits_dir):
    meta = validate_dataset(digits_dir)
    ids = {s: set(read_rows(meta["files"][s]).ids) for s in SPLITS}
    assert not (ids["train"] & ids["val"]) and not (ids["train"] & ids["test"]) and not (ids["val"] & ids["test"])
    for s in SPLITS:
        labels = read_rows(meta["files"][s]).labels
        frac = np.bincount(labels, minlength=10) / len(labels)
        assert np.all(np.abs(frac - 0.1) < 0.03), (s, frac)  # digits are ~balanced; stratification keeps it


def test_ingest_is_seeded(tmp_path):
    a = ingest("builtin:digits", tmp_path / "a", image_size=8, seed=3)
    b = ingest("builtin:digits", tmp_path / "b", image_size=8, seed=3)
    assert a["counts"] == b["counts"]
    assert read_rows(sorted((tmp_path / "a/val").glob("*.parquet"))).ids == read_rows(sorted((tmp_path / "b/val").glob("*.parquet"))).ids


def test_image_folder_ingest_skips_undecodable(ray_session, tmp_path):
    from PIL import Image

    src = tmp_path / "src"
    for c in ("cat", "dog"):
        (src / c).mkdir(parents=True)
        for i in range(6):
            Image.new("RGB", (20, 10), (i * 30, 0, 0) if c == "cat" else (0, i * 30, 0)).save(src / c / f"{i}.png")
    (src / "dog" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    meta = ingest(str(src), tmp_path / "out", fractions=(0.5, 0.25, 0.25))
    assert meta["classes"] == ["cat", "dog"]
    assert sum(meta["counts"].values()) == 12
    assert len(meta["skipped"]) == 1 and "broken.jpg" in meta["skipped"][0]
    rows = read_rows(sorted((tmp_path / "out/train").glob("*.parquet")))
    assert all(r.startswith(("cat/", "dog/")) for r in rows.ids)


def test_ingest_refuses_to_overwrite(tmp_path):
    ingest("builtin:digits", tmp_path / "d", image_size=8)
    with pytest.raises(UserError, match="already holds a dataset"):
        ingest("builtin:digits", tmp_path / "d", image_size=8)


def test_empty_shard_is_a_noop(tmp_path):
    files = write_shards([], tmp_path / "empty")
    assert len(files) == 1 and pq.read_metadata(files[0]).num_rows == 0
    assert validate_files(files, require_label=True, num_classes=3) == 0
    assert len(read_rows(files)) == 0


def _table(**cols):
    return pa.table(cols)


@pytest.mark.parametrize(
    "table, kwargs, expect",
    [
        (_table(id=pa.array(["a"]), label=pa.array([0], pa.int64())), {}, "missing required column 'image'"),
        (_table(image=pa.array([b"x"]), label=pa.array([0], pa.int64())), {"require_id": True}, "missing required column 'id'"),
        (_table(id=pa.array(["a"]), image=pa.array([b"x"])), {"require_label": True}, "missing required column 'label'"),
        (_table(id=pa.array(["a"]), image=pa.array(["x"])), {}, "column 'image' must be binary"),
        (_table(id=pa.array([1]), image=pa.array([b"x"])), {}, "column 'id' must be string"),
        (_table(id=pa.array(["a"]), image=pa.array([b"x"]), label=pa.array(["cat"])), {}, "column 'label' must be an integer"),
        (_table(id=pa.array(["a"]), image=pa.array([b"x"]), label=pa.array([7], pa.int64())), {"num_classes": 3}, "label 7 outside classes [0, 2]"),
        (_table(id=pa.array(["a"]), image=pa.array([b"x"]), label=pa.array([-1], pa.int64())), {"num_classes": 3}, "label -1 outside"),
    ],
)
def test_schema_errors_name_file_and_problem(tmp_path, table, kwargs, expect):
    f = tmp_path / "bad.parquet"
    pq.write_table(table, f)
    with pytest.raises(UserError) as e:
        validate_files([f], **kwargs)
    assert str(f) in str(e.value) and expect in str(e.value)


def test_not_parquet_and_empty_dir(tmp_path):
    (tmp_path / "junk.parquet").write_bytes(b"nope")
    with pytest.raises(UserError, match="not a readable Parquet file"):
        validate_files([tmp_path / "junk.parquet"])
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(UserError, match="no .parquet files"):
        list_parquet(tmp_path / "emptydir")
    with pytest.raises(UserError, match="no such file"):
        list_parquet(tmp_path / "missing")


def test_list_parquet_ignores_staging_dirs(tmp_path):
    write_shards([("a", b"x", 0)], tmp_path)
    write_shards([("b", b"x", 0)], tmp_path / ".staging-123")
    assert [f.name for f in list_parquet(tmp_path)] == ["part-00000.parquet"]
    assert len(list_parquet(str(tmp_path / "*.parquet"))) == 1


def test_dataset_label_out_of_range_fails_train_validation(tmp_path):
    ingest("builtin:digits", tmp_path / "d", image_size=8)
    meta = json.loads((tmp_path / "d/dataset.json").read_text())
    meta["classes"] = meta["classes"][:5]
    (tmp_path / "d/dataset.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="outside classes"):
        validate_dataset(tmp_path / "d")


def test_cli_ingest_and_errors(tmp_path, capsys):
    assert main(["ingest", "builtin:digits", str(tmp_path / "d"), "--image-size", "8", "--rows-per-shard", "1000"]) == 0
    assert "ingested 1797 images, 10 classes" in capsys.readouterr().out
    assert main(["ingest", "builtin:cifar", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err
    assert "unknown built-in dataset" in err and len(err.strip().splitlines()) == 1
    assert main(["ingest", "builtin:digits", str(tmp_path / "f"), "--splits", "0.5,0.5,0.5"]) == 2
    assert "summing to 1" in capsys.readouterr().err
