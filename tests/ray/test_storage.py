"""The filesystem layer on local disk, a real S3-protocol server (moto_server) and a GCS emulator, both on
loopback."""

from __future__ import annotations

import pickle
import time

import pytest
from helpers.servers import start_moto, stop

from imgcls_dist.cli import main
from imgcls_dist.storage import StorageError, is_uri, location


@pytest.fixture(params=["local", "s3", "gs"])
def root(request, tmp_path):
    if request.param == "local":
        return location(tmp_path / "root")
    store = request.getfixturevalue("s3" if request.param == "s3" else "gcs")
    return location(store.bucket() + "/root")


def test_files_round_trip_on_every_filesystem(root, tmp_path):
    (root / "a/b.txt").write_text("one")
    (root / "a/c.bin").write_bytes(b"\x00\x01")
    (root / "d/e.txt").write_text("two")
    assert (root / "a/b.txt").read_text() == "one" and (root / "a/c.bin").read_bytes() == b"\x00\x01"
    assert root.is_dir() and (root / "a").is_dir() and (root / "a/b.txt").is_file()
    assert not (root / "zz").exists() and (root / "a/b.txt").size() == 3
    assert [f.relative_to(root) for f in root.files()] == ["a/b.txt", "a/c.bin", "d/e.txt"]
    assert [f.relative_to(root) for f in root.files(".txt")] == ["a/b.txt", "d/e.txt"]
    assert [f.relative_to(root) for f in root.glob("*/*.txt")] == ["a/b.txt", "d/e.txt"]
    assert [d.name for d in root.iterdir()] == ["a", "d"]
    assert (root / "nothing").iterdir() == [] and (root / "nothing").files() == []

    moved = (root / "a/b.txt").move_to(root / "m/b.txt")
    assert moved.read_text() == "one" and not (root / "a/b.txt").exists()
    copied = (root / "d/e.txt").copy_to(root / "m/e.txt")
    assert copied.read_text() == "two" and (root / "d/e.txt").exists()

    local = tmp_path / "up"
    (local / "x").mkdir(parents=True)
    (local / "x/f.txt").write_text("uploaded")
    (root / "tree").upload(local)
    assert (root / "tree/x/f.txt").read_text() == "uploaded"
    down = (root / "tree").download(tmp_path / "down")
    assert (down / "x/f.txt").read_text() == "uploaded"

    (root / "d").delete()
    assert not (root / "d/e.txt").exists()
    (root / "d").delete()  # missing is fine
    with pytest.raises(StorageError, match="no such file"):
        (root / "gone.txt").read_bytes()


def test_location_naming_and_pickling(s3):
    loc = location(s3.bucket() + "/runs/r1/model.pt")
    assert loc.uri.startswith("s3://") and loc.name == "model.pt" and loc.stem == "model" and loc.suffix == ".pt"
    assert loc.parent.name == "r1" and is_uri(loc) and is_uri(loc.uri) and not is_uri("/tmp/x")
    again = pickle.loads(pickle.dumps(loc))  # a Ray task rebuilds the filesystem from its own environment
    assert again == loc and again.fs is not None
    with pytest.raises(TypeError, match="not a local path"):
        open(loc)  # noqa: SIM115 - a remote Location is never mistaken for a local file
    local = location("rel/path")
    assert local.is_local and local.path.startswith("/") and str(local) == local.path


@pytest.mark.parametrize("uri, message", [
    ("s3://", "missing bucket name"),
    ("s3:///x", "missing bucket name"),
    ("ftp://host/x", "unsupported scheme ftp://"),
])
def test_malformed_uris_are_one_line_errors(uri, message):
    with pytest.raises(StorageError, match=message):
        location(uri)


def test_missing_bucket_is_named(s3):
    with pytest.raises(StorageError, match="bucket 'no-such-bucket-x' does not exist"):
        location("s3://no-such-bucket-x/data").check_readable()
    with pytest.raises(StorageError, match="bucket 'no-such-bucket-x' does not exist"):
        location("s3://no-such-bucket-x/out").check_writable()


def test_wrong_endpoint_fails_fast_with_the_endpoint_named(s3, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # discard port: nothing listens
    t0 = time.perf_counter()
    with pytest.raises(StorageError, match=r"cannot reach http://127.0.0.1:9 .*AWS_ENDPOINT_URL"):
        location("s3://bucket/x").check_writable()
    assert time.perf_counter() - t0 < 30  # bounded by the connect timeout x the SDK's attempts


def test_missing_credentials_are_caught_before_any_request(s3, monkeypatch, tmp_path):
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.aws
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(StorageError, match="no AWS credentials"):
        location("s3://bucket/x")


def test_rejected_credentials_say_access_denied(monkeypatch):
    proc, endpoint = start_moto({"INITIAL_NO_AUTH_ACTION_COUNT": "0"})  # a store that checks signatures
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "not-a-known-key")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
        with pytest.raises(StorageError, match="access denied"):
            location("s3://bucket/data").check_readable()
    finally:
        stop(proc)


def test_cli_storage_errors_exit_2_with_one_line_and_write_nothing(s3, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bucket = s3.bucket()
    location(f"{bucket}/noshards/README.txt").write_text("no parquet here")
    cases = [
        (["ingest", "builtin:digits", "s3://no-such-bucket-y/digits"], "bucket 'no-such-bucket-y' does not exist"),
        (["infer", "--models", "m.pt", "--input", f"{bucket}/noshards/", "--output", "out"], "no .parquet files"),
        (["infer", "--models", "m.pt", "--input", f"{bucket}/missing", "--output", "out"], "missing: no such file"),
        (["evaluate", f"{s3.bucket()}/preds"], "no such predictions directory"),
        (["predict", "x.png", "--models", "s3://no-such-bucket-y/m.pt"], "bucket 'no-such-bucket-y' does not exist"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0] and "Traceback" not in err[0], (argv, err)
    assert list(tmp_path.iterdir()) == []  # nothing written locally (no 's3:' directory, no out/)
