"""The wheel is what a user installs: it carries the configs `imgcls-dist demo` reads, and leaves the
benchmarks and tests behind."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_wheel_carries_the_demo_configs_and_the_demo_reads_them_from_the_install(tmp_path: Path):
    from imgcls_dist.demo import DEMO_MODELS

    # From a copy without build outputs: setuptools reuses an earlier build's file list (egg-info), which
    # would hide a file the package data no longer names.
    src = tmp_path / "src"
    skip = {".git", ".venv", "build", "imgcls_dist.egg-info", "runs", "data", ".pytest_cache"}
    shutil.copytree(ROOT, src, symlinks=True,
                    ignore=lambda d, names: [n for n in names if (Path(d) == ROOT and n in skip) or n == "__pycache__"])
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path / "dist"), str(src)], check=True, timeout=300, cwd=tmp_path)
    wheel = next((tmp_path / "dist").glob("imgcls_dist-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for model in DEMO_MODELS:
        assert f"imgcls_dist/configs/{model}.yaml" in names
    assert "imgcls_dist/configs/recipes/small_images.yaml" in names  # the quick start's recipes
    assert not [n for n in names if n.startswith(("benchmarks/", "tests/"))]

    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, timeout=300)
    probe = ("import sys; import imgcls_dist.demo as d; from imgcls_dist.config import SHIPPED_CONFIGS, load_config; "
             "[load_config(SHIPPED_CONFIGS / f'{m}.yaml') for m in d.DEMO_MODELS]; "
             "from imgcls_dist.train.recipes import list_recipes; assert 'small_images' in list_recipes(); "
             "print(sorted({m.__file__.rsplit('/imgcls_dist/', 1)[0] for n, m in sys.modules.items() "
             "if n.startswith('imgcls_dist') and getattr(m, '__file__', None)}))")
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == str([str(target)])  # every module from the installed copy, not this checkout
