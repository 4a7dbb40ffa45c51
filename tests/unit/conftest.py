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


def ray_in_this_process() -> list[str]:
    ray = sys.modules.get("ray")
    return ray_daemons_started_by_me() + (["ray.init() in this process"] if ray and ray.is_initialized() else [])


@pytest.fixture(autouse=True)
def starts_no_ray(request):
    # A unit test may run in the process that holds the shared Ray (once that process has run its Ray tests,
    # xdist gives it unit tests too): only what the test itself started counts.
    before = set(ray_in_this_process())
    yield
    started = [x for x in ray_in_this_process() if x not in before]
    if started:
        pytest.fail(f"{request.node.nodeid} started Ray ({', '.join(started)}): tests that start Ray belong outside "
                    "tests/unit/ (see tests/conftest.py)", pytrace=False)
