"""train.mixed_precision resolved for the device (train/setup.py resolve_mixed_precision)."""

import pytest

from imgcls_dist.train import setup


@pytest.mark.parametrize("native", [True, False])
def test_cpu_auto_is_bf16_where_native_and_bf16_is_honoured(monkeypatch, capsys, native):
    monkeypatch.setattr(setup, "cpu_has_native_bf16", lambda: native)
    assert setup.resolve_mixed_precision("auto", cuda=False) == ("bf16" if native else "no")
    assert setup.resolve_mixed_precision("no", cuda=False) == "no"
    assert setup.resolve_mixed_precision("bf16", cuda=False) == "bf16"
    assert ("emulated, slower than fp32" in capsys.readouterr().err) is (not native)
    assert setup.resolve_mixed_precision("fp16", cuda=False) == "no"
    assert "no CPU autocast for training" in capsys.readouterr().err
