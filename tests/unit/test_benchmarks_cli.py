"""`python -m benchmarks NAME` reaches every benchmark it lists, and answers a bad config in one line."""

from __future__ import annotations

import ast
import importlib
import inspect
import subprocess
import sys
from pathlib import Path

import benchmarks.__main__ as bench_main

ROOT = Path(__file__).resolve().parents[2]


def test_every_listed_benchmark_imports_what_it_calls():
    for name, fn in bench_main.BENCHMARKS.items():
        for node in ast.walk(ast.parse(inspect.getsource(fn))):
            if isinstance(node, ast.ImportFrom):
                module = importlib.import_module(node.module)
                missing = [a.name for a in node.names if not hasattr(module, a.name)]
                assert not missing, f"{name}: {node.module} has no {missing}"


def test_a_missing_config_is_one_line_and_exit_2(tmp_path: Path):
    out = subprocess.run([sys.executable, "-m", "benchmarks", "tune", "--config", str(tmp_path / "nope.yaml")],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip() == f"benchmarks tune: error: {tmp_path / 'nope.yaml'}: config file not found"
