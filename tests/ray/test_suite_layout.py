"""The suite's scheduling convention holds: a test under tests/unit/ that starts Ray fails there."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

STARTS_RAY = """
import ray


def test_starts_a_ray():
    ray.init(num_cpus=1, include_dashboard=False)
    assert ray.is_initialized()
"""


@pytest.mark.own_ray
def test_a_unit_test_that_starts_ray_fails(tmp_path: Path):
    unit = tmp_path / "unit"
    unit.mkdir()
    shutil.copy(ROOT / "tests" / "unit" / "conftest.py", unit / "conftest.py")
    (unit / "test_starts_ray.py").write_text(STARTS_RAY)
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
                          "-o", "addopts=", str(unit)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 1, out.stdout[-2000:]
    assert "started Ray (" in out.stdout and "belong outside tests/unit/" in out.stdout, out.stdout[-2000:]
    assert "1 passed, 1 error" in out.stdout, out.stdout[-500:]  # the test body passed; the guard failed it
