"""`imgcls-dist evaluate`: accuracy equals sklearn's on the same rows, report files, --compare table."""

from __future__ import annotations

import csv
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers.image_fixtures import damaged, write_image_fixtures
from sklearn.metrics import accuracy_score, balanced_accuracy_score, recall_score
from helpers.model_files import digit_rows, save_model, write_input

from imgcls_dist.cli import main
from imgcls_dist.evaluate.metrics import expected_calibration_error
from imgcls_dist.batch.pipeline import run_batch_inference

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def outs(ray_session, tiny_digits_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("eval")
    a = save_model(d / "a", "lenet5", 16, seed=11)
    b = save_model(d / "b", "lenet5", 16, seed=12)
    rows = digit_rows(tiny_digits_dir, "test", limit=200)
    rows += [(f"nolabel-{i}", b, None) for i, b, _ in rows[:5]]
    rows += [(f"bad-{fx.name}", fx.path.read_bytes(), 3) for fx in damaged(write_image_fixtures(d / "fx"))[:2]]
    write_input(d / "in", rows)
    # the ensemble run goes through the CLI, so `infer`'s argument wiring is covered too
    ens = d / "ensemble_tta"
    assert main(["infer", "--models", str(a), str(b), "--input", str(d / "in"), "--output", str(ens),
                 "--batch-size", "64", "--actors", "1"]) == 0
    single = d / "a_plain"
    run_batch_inference(a, d / "in", single, tta="none", verbose=False)
    return d, ens, single


def test_accuracy_equals_sklearn_and_reports_are_written(outs, capsys):
    d, ens, _ = outs
    capsys.readouterr()
    assert main(["evaluate", str(ens)]) == 0
    out = capsys.readouterr().out
    t = pa.concat_tables(pq.read_table(f) for f in ens.glob("*.parquet"))
    labels, errors = t.column("label").to_pylist(), t.column("error").to_pylist()
    keep = [lbl is not None and err is None for lbl, err in zip(labels, errors)]
    y_true = [v for v, k in zip(t.column("label").to_pylist(), keep) if k]
    y_pred = [v for v, k in zip(t.column("pred").to_pylist(), keep) if k]
    assert len(y_true) == 200
    acc, balanced = accuracy_score(y_true, y_pred), balanced_accuracy_score(y_true, y_pred)
    assert f"accuracy {acc:.4f} (balanced {balanced:.4f}) on 200 rows" in out
    assert "2 error rows" in out and "5 rows without label" in out
    report = ens / "eval"
    assert (report / "confusion_matrix.png").stat().st_size > 1000
    assert f"accuracy: {acc:.4f}, balanced accuracy: {balanced:.4f}" in (report / "classification_report.txt").read_text()
    metrics = json.loads((report / "metrics.json").read_text())
    present = sorted(set(y_true))
    recall = recall_score(y_true, y_pred, labels=present, average=None)
    assert metrics["balanced_accuracy"] == pytest.approx(balanced)
    assert [metrics["per_class_recall"][str(c)] for c in present] == pytest.approx(list(recall))


def test_compare_prints_table_and_csv(outs, capsys):
    d, ens, single = outs
    capsys.readouterr()
    assert main(["evaluate", str(ens), "--name", "ensemble+tta", "--compare", f"single={single}",
                 "--report-dir", str(d / "cmp")]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("name"))
    assert "accuracy" in header and "vs_best_single" in header
    rows = list(csv.DictReader(open(d / "cmp" / "comparison.csv")))
    assert [r["name"] for r in rows] == ["ensemble+tta", "single"]
    assert rows[1]["models"] == "1" and rows[1]["views"] == "identity" and float(rows[1]["vs_best_single"]) == 0
    assert rows[0]["models"] == "2"
    gain = float(rows[0]["accuracy"]) - float(rows[1]["accuracy"])
    assert float(rows[0]["vs_best_single"]) == pytest.approx(gain, abs=2e-4)
    # calibration columns, recomputed here from the probs column of the same rows
    for row, out_dir in zip(rows, (ens, single)):
        t = pa.concat_tables(pq.read_table(f) for f in out_dir.glob("*.parquet"))
        keep = [lbl is not None and err is None for lbl, err in zip(t.column("label").to_pylist(),
                                                                      t.column("error").to_pylist())]
        probs = np.array([p for p, k in zip(t.column("probs").to_pylist(), keep) if k], np.float64)
        y = np.array([v for v, k in zip(t.column("label").to_pylist(), keep) if k])
        assert float(row["nll"]) == pytest.approx(-np.log(probs[np.arange(len(y)), y]).mean(), abs=1e-4)
        assert float(row["ece"]) == pytest.approx(expected_calibration_error(probs, y), abs=1e-4)
        assert row["calibrated"] == "no"
    assert (d / "cmp" / "reliability.png").stat().st_size > 5000 and "reliability.png" in out


def test_evaluate_refuses_incomplete_or_mismatched(outs, tmp_path, capsys):
    d, ens, _ = outs
    (tmp_path / "partial").mkdir()
    pq.write_table(pq.read_table(next(ens.glob("*.parquet"))), tmp_path / "partial" / "part-0.parquet")
    assert main(["evaluate", str(tmp_path / "partial")]) == 2
    assert "did not finish" in capsys.readouterr().err
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "dataset.json").write_text('{"classes": ["x", "y"]}')
    assert main(["evaluate", str(ens), "--classes", str(tmp_path / "ds" / "dataset.json")]) == 2
    assert "classes differ" in capsys.readouterr().err
