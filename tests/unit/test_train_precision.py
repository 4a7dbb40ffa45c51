"""train.mixed_precision resolved for the device and described on the job line (train/mixed_precision.py)."""

import pytest

import imgcls_dist.predictor.precision as precision
from imgcls_dist.train import mixed_precision


@pytest.mark.parametrize("native", [True, False])
def test_cpu_auto_is_bf16_where_native_and_bf16_is_honoured(monkeypatch, capsys, native):
    # what the CPU is said to have, at the one place both training's and inference's auto rules read it
    monkeypatch.setattr(precision, "native_bf16_features", lambda: ["AVX512-BF16"] if native else [])
    assert mixed_precision.resolve_mixed_precision("auto", cuda=False) == ("bf16" if native else "no")
    assert mixed_precision.resolve_mixed_precision("no", cuda=False) == "no"
    assert mixed_precision.resolve_mixed_precision("bf16", cuda=False) == "bf16"
    assert ("emulated, slower than fp32" in capsys.readouterr().err) is (not native)
    assert mixed_precision.resolve_mixed_precision("fp16", cuda=False) == "no"
    assert "no CPU autocast for training" in capsys.readouterr().err


def test_the_job_line_says_what_auto_trains_in(monkeypatch):
    monkeypatch.setattr(precision, "native_bf16_features", lambda: ["AVX512-BF16"])
    assert (mixed_precision.describe_mixed_precision("auto", gpu=False) ==
            "mixed precision bf16 (auto: CPU has AVX512-BF16)")
    monkeypatch.setattr(precision, "native_bf16_features", lambda: [])
    assert (mixed_precision.describe_mixed_precision("auto", gpu=False) ==
            "mixed precision no (auto: CPU lacks AVX512-BF16 and AMX-BF16)")
    assert mixed_precision.describe_mixed_precision("no", gpu=False) == "mixed precision no"
    assert "else fp16" in mixed_precision.describe_mixed_precision("auto", gpu=True)
