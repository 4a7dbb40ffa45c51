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


def test_the_long_tailed_dataset_keeps_val_and_test_and_cuts_train_to_the_profile(tmp_path: Path):
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from benchmarks.imbalance_bench import long_tail_counts, write_long_tail
    from imgcls_dist.data.schema import SHARD_SCHEMA, validate_dataset

    assert long_tail_counts(4, 80, 10) == [80, 40, 20, 10]
    src = tmp_path / "src"
    labels = {"train": [c for c in range(4) for _ in range(90)], "val": [0, 1, 2, 3], "test": [3, 2, 1, 0, 0]}
    for split, ys in labels.items():
        (src / split).mkdir(parents=True)
        pq.write_table(pa.table({"id": [f"{split}-{i}" for i in range(len(ys))], "image": [b"x"] * len(ys),
                                 "label": ys}, schema=SHARD_SCHEMA), src / split / "part-00000.parquet")
    counts = {s: len(ys) for s, ys in labels.items()}
    (src / "dataset.json").write_text(json.dumps({
        "classes": ["a", "b", "c", "d"], "counts": counts, "source": "made here",
        "class_counts": {s: {k: ys.count(i) for i, k in enumerate("abcd")} for s, ys in labels.items()}}))
    assert write_long_tail(src, tmp_path / "out", most=80, fewest=10) == [80, 40, 20, 10]
    meta = validate_dataset(tmp_path / "out")
    assert meta["rows"] == {"train": 150, "val": 4, "test": 5}
    assert meta["class_counts"]["train"] == {"a": 80, "b": 40, "c": 20, "d": 10}
    ids = pq.read_table(tmp_path / "out" / "train").column("id").to_pylist()
    assert len(set(ids)) == 150 and all(i.startswith("train-") for i in ids)
