"""--backend: the auto rule on every kind of device, the errors for combinations that cannot run, ONNX Runtime's
forward against torch's fp32 on real digit images (TTA views, temperatures, an ensemble of two input sizes), and
the flag on every command that takes it. The batch job and serve with this backend: tests/ray."""

from __future__ import annotations

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
from imgcls_dist.predictor.backend import backend_for, choose_runtime
from imgcls_dist.predictor.precision import PrecisionChoice
from imgcls_dist.predictor.predictor import EnsemblePredictor
from imgcls_dist.serve.settings import ServeSettings
from imgcls_dist.storage import location

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
FP32, BF16 = PrecisionChoice("fp32", "auto: CPU lacks them"), PrecisionChoice("bf16", "auto: CPU has them")


def test_auto_picks_onnxruntime_only_for_auto_fp32_on_a_cpu_with_the_runtime_installed():
    assert str(backend_for("auto", "auto", FP32, CPU, True)) == \
        "backend onnxruntime (auto: fp32 on this CPU, where onnxruntime is faster)"
    assert backend_for("auto", "auto", FP32, CPU, False).reason == "auto: fp32 on this CPU, onnxruntime not installed"
    assert str(backend_for("auto", "auto", BF16, CPU, True)) == "backend torch (auto: bf16 on this CPU)"
    assert str(backend_for("auto", "fp32", FP32, CPU, True)) == "backend torch (auto: fp32 given)"
    assert str(backend_for("auto", "auto", BF16, CUDA, True)) == "backend torch (auto: cuda device)"
    for given in ("torch", "onnxruntime"):
        assert str(backend_for(given, "auto", BF16, CPU, False)) == f"backend {given} (given)"


def test_onnxruntime_runs_fp32_on_the_cpu_only(monkeypatch):
    monkeypatch.setattr(precision, "native_bf16_features", lambda: ["AVX512-BF16"])
    runtime, chosen = choose_runtime("onnxruntime", "auto", "cpu")
    assert (runtime.backend, chosen.precision, chosen.reason) == ("onnxruntime", "fp32",
                                                                  "the onnxruntime backend runs fp32")
    assert choose_runtime("auto", "auto", "cpu")[0].backend == "torch"  # bf16 torch where the CPU has bf16
    with pytest.raises(UserError, match="runs fp32 or int8, not bf16; use --backend torch for bf16"):
        choose_runtime("onnxruntime", "bf16", "cpu")
    with pytest.raises(UserError, match="runs on the CPU only, not on cuda"):
        choose_runtime("onnxruntime", "auto", "cuda")
    with pytest.raises(UserError, match="--backend: must be one of auto, torch, onnxruntime, got 'tvm'"):
        choose_runtime("tvm", "auto", "cpu")


def test_compile_is_for_the_torch_backend(tmp_path):
    with pytest.raises(UserError, match="--compile: compiles torch models; the forward runs in backend onnxruntime"):
        EnsemblePredictor([save_model(tmp_path / "m")], backend="onnxruntime", compile=True)


def test_onnxruntime_answers_as_torch_fp32_with_views_temperatures_and_two_input_sizes(tmp_path):
    paths = [save_model(tmp_path / "a", "lenet5", 16, seed=1), save_model(tmp_path / "b", "resnet18", 24, seed=2)]
    kw = dict(views="identity,shift_left,zoom_in", temperatures=[0.5, 2.0], weights=[0.3, 0.7], device="cpu")
    ort = EnsemblePredictor(paths, backend="onnxruntime", **kw)
    ref = EnsemblePredictor(paths, backend="torch", precision="fp32", **kw)
    assert (ort.backend, ort.precision, ref.backend) == ("onnxruntime", "fp32", "torch")
    imgs, _, _ = digits_images(24)
    small, _, _ = digits_images(16)
    x = {(16, 3): np.stack(small[:37]), (24, 3): np.stack(imgs[:37])}  # 37: not a multiple of any batch
    got, got_members = ort.predict_uint8(x, return_members=True)
    want, want_members = ref.predict_uint8(x, return_members=True)
    assert np.abs(got - want).max() <= 1e-4 and (got.argmax(1) == want.argmax(1)).all()
    for g, w in zip(got_members, want_members):
        assert np.abs(g - w).max() <= 1e-4
    assert abs(ort.view_logits(x) - ref.view_logits(x)).max() <= 1e-3  # what ensemble build fits on


@pytest.mark.parametrize("command", [["predict", "a.png"], ["infer", "--input", "i", "--output", "o"], ["serve"]])
def test_every_inference_command_takes_backend(command, capsys):
    parser = build_parser()
    args = [*command, "--models", "m.pt"]
    assert parser.parse_args(args).backend == "auto"
    assert parser.parse_args([*args, "--backend", "onnxruntime"]).backend == "onnxruntime"
    with pytest.raises(SystemExit) as exc:
        parser.parse_args([*args, "--backend", "tvm"])
    assert exc.value.code == 2 and "invalid choice: 'tvm'" in capsys.readouterr().err


def test_serve_settings_check_backend():
    assert ServeSettings(models=["m.pt"]).backend == "auto"
    with pytest.raises(ValueError, match="must be one of auto, torch, onnxruntime"):
        ServeSettings(models=["m.pt"], backend="tvm")


def test_batch_job_fingerprint_holds_the_backend(tmp_path):
    model = save_model(tmp_path / "m")
    job = InferJob(files=[], layout=[], rows_in=0, with_label=False, model_paths=[str(model)], weights=None,
                   combine="mean", views=["identity"], keys=[(16, 3)], members=[{"path": str(model)}],
                   classes=[str(i) for i in range(10)], norm_weights=[1.0], temperatures=[1.0], batch_size=8,
                   out=location(tmp_path / "out"))
    torch_fp, ort_fp = (fingerprint(job, "run", "cpu", "fp32", b) for b in ("torch", "onnxruntime"))
    assert difference(torch_fp, ort_fp) == "backend (torch -> onnxruntime)"
    before = {k: v for k, v in torch_fp.items() if k not in ("backend", "calibration")}  # written before both existed
    assert difference(before, torch_fp) is None and difference(before, ort_fp) == "backend (torch -> onnxruntime)"
    int8 = [fingerprint(job, "run", "cpu", "int8", "onnxruntime", c) for c in ("s3://b/digits", "s3://b/other")]
    assert difference(int8[0], int8[1]) == "calibration (s3://b/digits -> s3://b/other)"


@pytest.fixture(scope="module")
def digits_16(tmp_path_factory):
    """A dataset directory of the digits at 16 px (train 1,000 / val 300 / test the rest) and a lenet5 trained on
    it for a few epochs: a real classifier, whose answers int8 rounding must not change."""
    from helpers.model_files import train_digits_model

    from imgcls_dist.data.builtin import encode_png
    from imgcls_dist.data.shards import write_shards

    root = tmp_path_factory.mktemp("digits16")
    imgs, labels, _ = digits_images(16)
    rows = [(f"d{i}", encode_png(im), int(y)) for i, (im, y) in enumerate(zip(imgs, labels))]
    for split, part in (("train", rows[:1000]), ("val", rows[1000:1300]), ("test", rows[1300:])):
        write_shards(part, root / "data" / split, rows_per_shard=500)
    return root / "data", train_digits_model(root / "m", root / "data", epochs=15, seed=0)


def test_int8_answers_as_fp32_on_real_digits_and_runs_in_onnxruntime(digits_16):
    from imgcls_dist.data.schema import split_files
    from imgcls_dist.predictor.prepare import labelled_batches

    data, model = digits_16
    int8 = EnsemblePredictor([model], views="identity,shift_left", precision="int8", calibration=data, backend="auto")
    fp32 = EnsemblePredictor([model], views="identity,shift_left", precision="fp32", backend="torch")
    assert (int8.precision, int8.backend) == ("int8", "onnxruntime")
    assert str(int8.backend_choice) == "backend onnxruntime (auto: int8 runs in onnxruntime)"
    ((y, x),) = list(labelled_batches(split_files(data, "test"), [(16, 3)], 1000))
    p8, p32 = int8.predict_uint8(x), fp32.predict_uint8(x)
    assert (p32.argmax(1) == y).mean() > 0.9  # the classifier is real
    assert (p8.argmax(1) == p32.argmax(1)).mean() >= 0.98 and np.abs(p8 - p32).max() > 1e-4  # quantized, not fp32
    np.testing.assert_allclose(p8.sum(axis=1), 1.0, atol=1e-5)


def test_int8_needs_a_calibration_dataset_and_onnxruntime_on_a_cpu(digits_16, tmp_path):
    data, model = digits_16
    with pytest.raises(UserError, match=r"--precision int8 needs --calibration DATASET"):
        EnsemblePredictor([model], precision="int8", backend="auto")
    with pytest.raises(UserError, match=rf"--calibration {data}: only --precision int8 is calibrated"):
        EnsemblePredictor([model], precision="fp32", calibration=data)
    with pytest.raises(UserError, match=r"missing split directory val/"):
        EnsemblePredictor([model], precision="int8", calibration=tmp_path, backend="auto")
    with pytest.raises(UserError, match=r"--precision int8: runs in ONNX Runtime; use --backend onnxruntime"):
        choose_runtime("torch", "int8", "cpu")
    with pytest.raises(UserError, match=r"--precision int8: runs on the CPU only, not on cuda"):
        choose_runtime("auto", "int8", "cuda")
    assert build_parser().parse_args(["predict", "a.png", "--models", "m", "--precision", "int8", "--calibration",
                                      "d"]).calibration == "d"


def test_ensemble_build_does_not_offer_int8(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["ensemble", "build", "--models", "m", "--val", "v", "--out", "o", "--precision",
                                   "int8"])
    assert "invalid choice: 'int8'" in capsys.readouterr().err
