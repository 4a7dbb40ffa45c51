"""Smoke test of the inference benchmarks at tiny sizes: the ratios exist and are positive (no timing asserts)."""

from __future__ import annotations

import pytest

from benchmarks.infer_bench import BENCH_TTA, bench_infer, bench_predict_latency

pytestmark = pytest.mark.e2e


def test_bench_infer_returns_ratios(ray_session, tmp_path, capsys):
    r = bench_infer(rows=(100, 200), arch="lenet5", image_size=16, batch_size=64, workdir=tmp_path,
                    raw_seconds=0.2, warmup=False)
    for key in ("pipeline_efficiency", "rss_ratio", "pss_ratio", "raw_images_per_s", "job_images_per_s"):
        assert r[key] > 0, key
    assert set(r["runs"]) == {100, 200} and r["runs"][200]["rows"] == 200
    assert all(run["peak_pss_mb"] > 0 and run["peak_rss_mb"] >= run["peak_pss_mb"] for run in r["runs"].values())
    assert "pipeline efficiency" in capsys.readouterr().out


def test_bench_predict_latency_reports_each_tta(tmp_path):
    r = bench_predict_latency(arch="lenet5", image_size=16, repeats=3, workdir=tmp_path, verbose=False)
    assert r["none"]["views"] == 1 and r[BENCH_TTA]["views"] == len(BENCH_TTA.split(","))
    assert r["none"]["median_ms"] > 0 and r[BENCH_TTA]["median_ms"] > 0
