"""--precision: native-bf16 detection, the auto/fp32/bf16 rule per device, the predictor's answers in bf16 against
fp32 on real digit images, the flag on every command that takes it, and the batch job's resume fingerprint."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.model_files import save_model

import imgcls_dist.predictor.precision as precision
from imgcls_dist.batch.job import InferJob
from imgcls_dist.batch.resume import difference, fingerprint
from imgcls_dist.cli import build_parser
from imgcls_dist.data.builtin import digits_images
from imgcls_dist.errors import UserError
from imgcls_dist.predictor.precision import choose_precision, cpu_has_native_bf16, resolve_precision
from imgcls_dist.predictor.predictor import EnsemblePredictor
from imgcls_dist.serve.settings import ServeSettings
from imgcls_dist.storage import location

CPUINFO = Path("/proc/cpuinfo")


def cpuinfo_flags() -> set[str]:
    line = next(ln for ln in CPUINFO.read_text().splitlines() if ln.startswith("flags"))
    return set(line.partition(":")[2].split())


@pytest.mark.skipif(not CPUINFO.is_file(), reason="Linux: /proc/cpuinfo")
def test_native_bf16_detection_agrees_with_proc_cpuinfo(monkeypatch):
    expected = bool(cpuinfo_flags() & {"avx512_bf16", "amx_bf16"})
    got = cpu_has_native_bf16()
    assert isinstance(got, bool) and got == expected
    # the /proc/cpuinfo reading a torch without torch.cpu.get_capabilities falls back on says the same
    monkeypatch.delattr(torch.cpu, "get_capabilities", raising=False)
    assert cpu_has_native_bf16() == expected


@pytest.fixture
def native(monkeypatch):
    """Set what the CPU is said to have: native(True) -> AVX512-BF16, native(False) -> none."""
    precision._warn_once.cache_clear()
    return lambda has: monkeypatch.setattr(precision, "native_bf16_features", lambda: ["AVX512-BF16"] if has else [])


def test_auto_is_bf16_only_on_cpus_with_native_bf16(native, capsys):
    native(True)
    chosen = choose_precision("auto", "cpu")
    assert (chosen.precision, chosen.amp_dtype) == ("bf16", torch.bfloat16)
    assert str(chosen) == "precision bf16 (auto: CPU has AVX512-BF16)"
    assert resolve_precision("fp32", "cpu") == "fp32" and choose_precision("fp32", "cpu").amp_dtype is None
    assert resolve_precision("bf16", "cpu") == "bf16"
    native(False)
    chosen = choose_precision("auto", "cpu")
    assert chosen.precision == "fp32" and "lacks AVX512-BF16 and AMX-BF16" in chosen.reason
    assert resolve_precision("fp32", "cpu") == "fp32"
    assert capsys.readouterr().err == ""


def test_forced_bf16_without_native_support_runs_and_warns_once(native, capsys):
    native(False)
    assert resolve_precision("bf16", "cpu") == "bf16"
    assert resolve_precision("bf16", torch.device("cpu")) == "bf16"
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "emulated" in err and "auto picks fp32" in err


def test_bad_settings_are_user_errors(native):
    native(True)
    with pytest.raises(UserError, match="must be one of auto, fp32, bf16"):
        resolve_precision("fp64", "cpu")
    with pytest.raises(UserError, match="CUDA devices only"):
        resolve_precision("fp16", "cpu")


def test_cuda_keeps_bf16_where_supported_else_fp16(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_precision("auto", "cuda") == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_precision("auto", "cuda") == "fp16" and resolve_precision("fp32", "cuda") == "fp32"
    assert choose_precision("fp16", "cuda").amp_dtype is torch.float16  # handed on to actors and replicas
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a driver planning GPU actors it cannot see
    assert resolve_precision("auto", "cuda") == "bf16"


def digit_batch(size: int, n: int = 64) -> dict[tuple[int, int], np.ndarray]:
    imgs, _, _ = digits_images(size)
    return {(size, 3): np.stack(imgs[:n])}


@pytest.mark.parametrize("arch,size", [("lenet5", 16), ("resnet18", 32)])
def test_bf16_predictor_answers_as_fp32_within_bf16_rounding(tmp_path, arch, size):
    path = save_model(tmp_path / arch, arch, size, seed=3)
    fp32 = EnsemblePredictor([path], views="identity,shift_left", device="cpu", precision="fp32")
    bf16 = EnsemblePredictor([path], views="identity,shift_left", device="cpu", precision="bf16")
    assert (fp32.precision, fp32.amp_dtype, bf16.precision, bf16.amp_dtype) == ("fp32", None, "bf16", torch.bfloat16)
    assert bf16.channels_last and not fp32.channels_last  # fp32 on a CPU keeps the model file's layout
    x = digit_batch(size)
    p32, p16 = fp32.predict_uint8(x), bf16.predict_uint8(x)
    assert p16.dtype == np.float32
    np.testing.assert_allclose(p16.sum(axis=1), 1.0, atol=1e-5)  # softmax and combining stay fp32
    np.testing.assert_allclose(p16, p32, atol=3e-2)  # bf16 keeps ~3 significant digits of each activation
    assert (p16.argmax(1) == p32.argmax(1)).mean() >= 0.9


@pytest.mark.parametrize("command", [["predict", "a.png"], ["infer", "--input", "i", "--output", "o"],
                                     ["serve"], ["ensemble", "build", "--val", "v", "--out", "o"]])
def test_every_inference_command_takes_precision(command, capsys):
    parser = build_parser()
    args = [*command, "--models", "m.pt"]
    assert parser.parse_args(args).precision == "auto"
    assert parser.parse_args([*args, "--precision", "bf16"]).precision == "bf16"
    with pytest.raises(SystemExit) as exc:
        parser.parse_args([*args, "--precision", "fp16"])
    assert exc.value.code == 2 and "invalid choice: 'fp16'" in capsys.readouterr().err


def test_serve_settings_check_precision():
    assert ServeSettings(models=["m.pt"]).precision == "auto"
    assert ServeSettings(models=["m.pt"], precision="fp16").precision == "fp16"  # what `serve` hands a GPU replica
    with pytest.raises(ValueError, match="must be one of auto, fp32, bf16"):
        ServeSettings(models=["m.pt"], precision="half")


def test_batch_job_fingerprint_holds_the_resolved_precision(tmp_path):
    model = save_model(tmp_path / "m")
    job = InferJob(files=[], layout=[], rows_in=0, with_label=False, model_paths=[str(model)], weights=None,
                   combine="mean", views=["identity"], keys=[(16, 3)], members=[{"path": str(model)}],
                   classes=[str(i) for i in range(10)], norm_weights=[1.0], temperatures=[1.0], batch_size=8,
                   out=location(tmp_path / "out"))
    fp32, bf16 = (fingerprint(job, "run", "cpu", p, "torch") for p in ("fp32", "bf16"))
    assert difference(fp32, fingerprint(job, "other-run", "cpu", "fp32", "torch")) is None
    assert difference(fp32, bf16) == "precision (fp32 -> bf16)"
    before = {k: v for k, v in fp32.items() if k != "precision"}  # a staging written before precision was recorded
    assert difference(before, fp32) == "precision (None -> fp32)"


def test_serve_hands_its_replicas_the_precision_it_prints(native):
    from imgcls_dist.serve.deployment import replica_settings

    native(True)
    settings, chosen, runtime = replica_settings(ServeSettings(models=["m.pt"]),
                                                 {"ray_actor_options": {"num_gpus": 0}})
    assert settings.precision == "bf16" and str(chosen) == "precision bf16 (auto: CPU has AVX512-BF16)"
    assert settings.backend == "torch" and str(runtime) == "backend torch (auto: bf16 on this CPU)"
    native(False)
    settings, chosen, runtime = replica_settings(ServeSettings(models=["m.pt"], precision="fp32"), {})
    assert (settings.precision, chosen.reason, settings.backend) == ("fp32", "given", "torch")
    settings, chosen, runtime = replica_settings(ServeSettings(models=["m.pt"]), {})
    assert (settings.precision, settings.backend) == ("fp32", "onnxruntime")
    assert str(runtime) == "backend onnxruntime (auto: fp32 on this CPU, where onnxruntime is faster)"
