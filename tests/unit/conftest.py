"""tests/unit/ holds the tests that start no Ray: they run beside the shared Ray's tests (tests/conftest.py).
This guard keeps the directory honest: a test here that starts Ray, in this process or in a child, fails."""

from __future__ import annotations

import sys

import psutil
import pytest

RAY_DAEMONS = ("raylet", "gcs_server")


def ray_daemons_started_by_me() -> list[str]:
    found = []
    for p in psutil.Process().children(recursive=True):
        try:
            name = p.name()
        except psutil.Error:
            continue
        if name in RAY_DAEMONS:
            found.append(f"{name} (pid {p.pid})")
    return found


@pytest.fixture(autouse=True)
def starts_no_ray(request):
    yield
    ray = sys.modules.get("ray")
    started = ray_daemons_started_by_me() + (["ray.init() in this process"] if ray and ray.is_initialized() else [])
    if started:
        pytest.fail(f"{request.node.nodeid} started Ray ({', '.join(started)}): tests that start Ray belong outside "
                    "tests/unit/ (see tests/conftest.py)", pytrace=False)
