"""Shared fixtures: one local Ray instance for the whole session (start-up costs seconds), and a small
digits dataset written once."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests import image_fixtures as a plain module

# Tests run on the 2-CPU CI machine: cap every torch/BLAS pool so parallel pieces don't oversubscribe.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "0")


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray with exactly 2 CPUs — the CI machine's size, so deadlock-prone sizing shows up here."""
    import ray

    from imgcls_dist.ray_utils import ensure_ray

    os.environ.pop("RAY_ADDRESS", None)
    ensure_ray(num_cpus=2)
    yield ray
    ray.shutdown()


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
