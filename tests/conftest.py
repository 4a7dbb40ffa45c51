"""Shared fixtures: one local Ray instance for the whole session (start-up costs seconds), a real
S3-protocol server on loopback (moto_server, started before Ray so every Ray worker inherits its endpoint and
credentials, as a user's MinIO setup would), and small digits datasets written once."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest

from helpers.servers import start_mlflow, start_moto, stop, stop_group
from imgcls_dist.ports import free_port, wait_listening


# Tests run on the 2-CPU CI machine: cap every torch/BLAS pool so parallel pieces don't oversubscribe.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "0")
# Train's controller polls its workers every 2 s by default; each tiny test run waits up to one poll to see
# its start, each checkpoint and its end. Polling faster changes no result, only the waiting.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")


def restore_env(saved: dict[str, str | None]) -> None:
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def s3():
    """A real S3-protocol server on loopback. Jobs reach it as a MinIO user's would: AWS_ENDPOINT_URL and
    (dummy) credentials in the environment. `s3.bucket()` makes a fresh bucket and returns its s3:// URI."""
    proc, endpoint = start_moto()
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)

    def bucket(prefix: str = "b") -> str:
        import pyarrow.fs as pafs

        name = f"{prefix}-{uuid.uuid4().hex[:10]}"
        pafs.S3FileSystem(endpoint_override=endpoint, region="us-east-1", allow_bucket_creation=True).create_dir(name)
        return f"s3://{name}"

    yield SimpleNamespace(endpoint=endpoint, env=env, bucket=bucket)
    stop(proc)
    restore_env(saved)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server on loopback (SQLite backend, local artifact root), one per pytest process.
    Its tracking URI is `mlflow_server.uri`; a test points a job at it with MLFLOW_TRACKING_URI (monkeypatch):
    jobs read MLflow's own variables, and pass them on to the Ray processes that log."""
    root = tmp_path_factory.mktemp("mlflow")
    proc, uri = start_mlflow(root)
    yield SimpleNamespace(uri=uri, root=root)
    stop_group(proc)


@pytest.fixture(scope="session")
def gcs():
    """A GCS emulator on loopback (gcp-storage-emulator's JSON API, which pyarrow's GcsFileSystem speaks),
    reached through STORAGE_EMULATOR_HOST. `gcs.bucket()` makes a fresh bucket and returns its gs:// URI."""
    port = free_port()
    exe = Path(sys.executable).with_name("gcp-storage-emulator")
    proc = subprocess.Popen([str(exe), "start", "--host", "127.0.0.1", "--port", str(port), "--in-memory"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_listening(port, proc, "gcp-storage-emulator")
    env = {"STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{port}", "GOOGLE_CLOUD_PROJECT": "imgcls-test"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the project only names the owner of the buckets made below

    def bucket(prefix: str = "g") -> str:
        import pyarrow.fs as pafs

        name = f"{prefix}-{uuid.uuid4().hex[:10]}"
        pafs.GcsFileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http", anonymous=True).create_dir(name)
        return f"gs://{name}"

    yield SimpleNamespace(bucket=bucket)
    stop(proc)
    restore_env(saved)


@pytest.fixture(scope="session")
def ray_session(s3):
    """A local Ray with exactly 2 CPUs — the CI machine's size, so deadlock-prone sizing shows up here.
    Started after the S3 server: Ray's workers inherit the environment that points at it."""
    import ray

    from imgcls_dist.ray_utils import ensure_ray

    os.environ.pop("RAY_ADDRESS", None)
    ensure_ray(num_cpus=2)
    yield ray
    ray.shutdown()


@pytest.fixture
def fresh_accelerate_state():
    """Local mode runs the loop in this process, and accelerate's state is a process-wide singleton: a
    previous config's settings (e.g. gradient accumulation) must not carry over. (Train's worker
    processes are new for every run, so the product needs no reset.)"""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory) -> Path:
    """The built-in digits ingested once (1,797 images at 32px)."""
    from imgcls_dist.data.ingest import ingest

    out = tmp_path_factory.mktemp("digits")
    ingest("builtin:digits", out, image_size=32, rows_per_shard=300, seed=0)
    return out


@pytest.fixture(scope="session")
def tiny_digits_dir(tmp_path_factory) -> Path:
    """A few hundred rows at 16px for fast end-to-end tests."""
    from imgcls_dist.data.ingest import ingest

    out = tmp_path_factory.mktemp("tiny_digits")
    ingest("builtin:digits", out, image_size=16, fractions=(0.2, 0.1, 0.7), rows_per_shard=100, seed=0)
    return out


@pytest.fixture(scope="session")
def digit_photo_classifier():
    """(predict, photos, labels): the bench's LeNet-5 trained on digit photos (seconds) and 1,000 held-out digit
    photo JPEGs, shared by the reduced-decode and device-decode agreement tests."""
    from benchmarks.decode_bench import digit_photos, fit_digits_lenet

    photos, labels = digit_photos(1000)
    return fit_digits_lenet(), photos, labels


# Which pytest process runs what, under `make test`'s `-n 2 --dist loadgroup`, by convention:
# - tests/unit/: tests that start no Ray (tests/unit/conftest.py fails one that does). No group: they fill the
#   second process, beside the shared Ray's, and the first one once its Ray tests are done.
# - @pytest.mark.own_ray: tests that start Rays of their own (a CLI job's local Ray, a multi-node cluster)
#   and never use the shared one; their Rays have their own ports and GCS. Group "own_ray", beside the rest.
# - every other test: group "ray", all in one process, so the suite keeps one 2-CPU Ray and the 2-CPU sizing
#   tests see exactly that. A new module is there unless its author says otherwise: the safe default.
# Tests sharing the digit-photo classifier fixture (seconds to build) share one process: group "photos".
UNIT_DIR = Path(__file__).parent / "unit"


def xdist_group(item: pytest.Item) -> str | None:
    if item.get_closest_marker("own_ray"):
        if "ray_session" in item.fixturenames:
            raise pytest.UsageError(f"{item.nodeid} is marked own_ray but uses the shared ray_session")
        return "own_ray"
    if UNIT_DIR in item.path.parents:
        return "photos" if "digit_photo_classifier" in item.fixturenames else None
    return "ray"


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the groups into the node ids
def pytest_collection_modifyitems(config, items):
    for item in items:
        if group := xdist_group(item):
            item.add_marker(pytest.mark.xdist_group(group))


@pytest.hookimpl(optionalhook=True)  # a pytest without pytest-xdist must still collect this suite
def pytest_xdist_node_collection_finished(node, ids):
    """In the xdist controller, with each worker's collected node ids: under `--dist loadgroup` xdist appends
    the group to every grouped test's id. Ray tests' ids without it (pytest 9.2 with xdist 3.8) would spread
    them over both processes, each with its own Ray: stop instead of running that way."""
    if node.config.getvalue("dist") != "loadgroup":
        return
    ungrouped = [i for i in ids if "@" not in i and not i.startswith("unit/") and "/unit/" not in i]
    if ungrouped:
        raise pytest.UsageError(f"pytest-xdist ignored the xdist_group mark of {ungrouped[0]} (tests/conftest.py); "
                                "see the pytest pin in pyproject.toml")
