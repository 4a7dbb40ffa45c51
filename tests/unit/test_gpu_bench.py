"""The GPU check script's CPU smoke run: every table row is produced, ratios are consistent with the
rates they divide, and the JSON it writes holds the same table (no timing asserts)."""

from __future__ import annotations

import json
import os

import pytest

from benchmarks.gpu_bench import run


def test_gpu_bench_runs_on_cpu_and_writes_its_table(tmp_path, capsys):
    out = tmp_path / "gpu.json"
    r = run(device="cpu", batch=2, size=32, warmup=0, iters=1, out=out, archs=("resnet18",), photo_size=(320, 240),
            photos=4)
    rows = {x["measure"]: x["value"] for x in r["rows"]}
    assert rows["train resnet18 ratio bf16/fp32"] == pytest.approx(
        rows["train resnet18 bf16+channels_last img/s"] / rows["train resnet18 fp32 img/s"])
    for k in ("predictor 1 view(s)", "predictor 4 view(s)", "predictor 1 view(s), NHWC numpy input",
              "predictor 1 view(s), NHWC numpy input, 4 micro-batches per call"):
        assert rows[f"infer resnet50 {k} img/s"] > 0
        assert rows[f"infer resnet50 {k} / forward only"] == pytest.approx(
            rows[f"infer resnet50 {k} img/s"] / rows["infer resnet50 forward only img/s"])
    assert rows["decode 0.077MP JPEG ratio device/CPU"] == pytest.approx(
        rows["decode 0.077MP JPEG -> 32px, device path img/s"]
        / rows[f"decode 0.077MP JPEG -> 32px, CPU path on {os.cpu_count()} threads img/s"])
    assert rows["decode device path / infer resnet50 forward only"] > 0
    assert "infer resnet50 predictor 1 view(s) torch.compile img/s" not in rows  # compile: CUDA only by default
    assert json.loads(out.read_text()) == json.loads(json.dumps(r))
    assert "bench gpu on cpu" in capsys.readouterr().out


def test_gpu_bench_cut_short_keeps_the_rows_it_measured(tmp_path):
    # A run under a time limit (tools/gpu_check.sh's BENCH_SECONDS): past max_seconds no new section starts, and
    # the JSON on disk already holds every row measured, the predictor's first.
    out = tmp_path / "gpu.json"
    r = run(device="cpu", batch=2, size=32, warmup=0, iters=1, out=out, archs=("resnet18",), photo_size=(320, 240),
            photos=4, max_seconds=0)
    assert r["skipped"] == ["decode", "train resnet18"]
    measures = [x["measure"] for x in r["rows"]]
    assert measures[0] == "infer resnet50 forward only img/s" and "infer resnet50 predictor 1 view(s) / forward only" in measures
    assert not any(m.startswith(("train", "decode")) for m in measures)
    assert json.loads(out.read_text()) == json.loads(json.dumps(r))
