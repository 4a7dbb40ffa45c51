"""`imgcls-dist export --format onnx`: real torch exports run in real ONNX Runtime and compared with the PyTorch
predictor (views "none"): a model file, a 1-channel model, a weighted and tempered ensemble as one graph,
members of different sizes as separate files, a resnet18, the batch axis, the metadata, the CLI and its errors.

The lenet export is made once per module and read by several tests: the exporter's first call costs seconds."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers.model_files import DIGITS, save_model

from imgcls_dist.cli import main
from imgcls_dist.errors import JobFailed, UserError
from imgcls_dist.export import onnx_export
from imgcls_dist.export.onnx_export import BATCH_AXIS, TOLERANCE, check_files, export_onnx
from imgcls_dist.predictor.manifest import load_ensemble_manifest
from imgcls_dist.predictor.predictor import EnsemblePredictor

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


# what the export is checked against: the PyTorch predictor without TTA, fp32 on the CPU
FP32_IDENTITY = {"views": "none", "device": "cpu", "precision": "fp32"}


def images(n: int, size: int, channels: int = 3, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, channels, size, size), dtype=np.uint8)


def onnx_probs(path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"images": x})[0]


def torch_probs(predictor: EnsemblePredictor, x: np.ndarray) -> np.ndarray:
    size, channels = x.shape[-1], x.shape[1]
    return predictor.predict_uint8({(size, channels): torch.from_numpy(x)})


def graph_meta(path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


def softmax(v) -> np.ndarray:
    e = np.exp(np.asarray(v, np.float64) - np.max(v))
    return e / e.sum()


@pytest.fixture(scope="module")
def lenet(tmp_path_factory):
    run = tmp_path_factory.mktemp("export") / "lenet_run"
    save_model(run, "lenet5", 16, seed=3)
    return run, export_onnx([str(run)])


def test_a_model_file_exports_beside_its_run_directory_and_matches_the_predictor(lenet):
    run, result = lenet
    (f,) = result.files
    assert f.path == run / "lenet_run.onnx" and f.path.is_file()
    assert f.max_diff <= TOLERANCE
    predictor = EnsemblePredictor([run / "model.pt"], **FP32_IDENTITY)
    for n in (1, 7, 3):
        x = images(n, 16, seed=n)
        got = onnx_probs(f.path, x)
        assert got.shape == (n, 10)
        np.testing.assert_allclose(got, torch_probs(predictor, x), atol=TOLERANCE, rtol=0)
        np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-5)


def test_the_graph_takes_uint8_with_a_dynamic_batch_axis(lenet):
    _, result = lenet
    model = onnx.load(str(result.files[0].path))
    (inp,) = model.graph.input
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    assert dims == [BATCH_AXIS, 3, 16, 16]
    assert result.files[0].input_shape == [BATCH_AXIS, 3, 16, 16]
    assert {o.domain or "ai.onnx": o.version for o in model.opset_import}["ai.onnx"] == onnx_export.OPSET


def test_metadata_round_trips(lenet):
    run, result = lenet
    meta = ort.InferenceSession(str(result.files[0].path), providers=["CPUExecutionProvider"]) \
        .get_modelmeta().custom_metadata_map
    assert json.loads(meta["classes"]) == DIGITS
    assert (meta["image_size"], meta["in_channels"], meta["arch"]) == ("16", "3", "lenet5")
    assert json.loads(meta["mean"]) == [0.5, 0.5, 0.5] and json.loads(meta["std"]) == [0.5, 0.5, 0.5]
    assert meta["source"] == str(run / "model.pt")
    assert meta["format_version"] == onnx_export.FORMAT_VERSION


def test_a_one_channel_model(tmp_path):
    path = save_model(tmp_path / "gray", "lenet5", 20, seed=4, in_channels=1)
    (f,) = export_onnx(path, out=tmp_path / "out").files
    assert f.path == tmp_path / "out" / "gray.onnx" and f.input_shape == [BATCH_AXIS, 1, 20, 20]
    x = images(3, 20, channels=1)
    predictor = EnsemblePredictor([path], **FP32_IDENTITY)
    np.testing.assert_allclose(onnx_probs(f.path, x), torch_probs(predictor, x), atol=TOLERANCE, rtol=0)


def test_an_ensemble_with_weights_and_temperatures_is_one_graph(tmp_path):
    # constant logits (last layer zeroed): the ensemble's answer is known by hand
    la, lb = [3.0, 1.0] + [0.0] * 8, [0.0, 2.0, 4.0] + [0.0] * 7
    a = save_model(tmp_path / "a", "lenet5", 16, logits=la)
    b = save_model(tmp_path / "b", "lenet5", 16, seed=1, logits=lb)
    manifest = tmp_path / "ens" / "ensemble.json"
    manifest.parent.mkdir()
    manifest.write_text(json.dumps({"models": [{"path": str(a), "weight": 3, "temperature": 2.0},
                                               {"path": str(b), "weight": 1, "temperature": 0.5}],
                                    "combine": "weighted", "views": ["identity", "shift_left"]}))
    result = export_onnx(manifest)
    (f,) = result.files
    assert f.path == tmp_path / "ens" / "ens.onnx" and len(f.members) == 2 and result.manifest is None
    assert result.dropped_views == ["shift_left"]
    x = images(7, 16)
    got = onnx_probs(f.path, x)
    want = 0.75 * softmax(np.array(la) / 2.0) + 0.25 * softmax(np.array(lb) / 0.5)
    np.testing.assert_allclose(got, np.broadcast_to(want, got.shape), atol=1e-5)
    predictor = EnsemblePredictor.from_spec(load_ensemble_manifest(manifest), **FP32_IDENTITY)
    np.testing.assert_allclose(got, torch_probs(predictor, x), atol=TOLERANCE, rtol=0)
    meta = graph_meta(f.path)
    assert meta["arch"] == "ensemble" and meta["combine"] == "weighted"
    assert [m["temperature"] for m in json.loads(meta["members"])] == [2.0, 0.5]


def test_members_of_different_sizes_are_exported_separately_with_a_manifest(tmp_path):
    a = save_model(tmp_path / "a", "lenet5", 16, seed=5)
    b = save_model(tmp_path / "b", "lenet5", 20, seed=6, in_channels=1)
    manifest = tmp_path / "mixed.json"
    manifest.write_text(json.dumps({"models": [{"path": str(a), "weight": 1, "temperature": 1.5},
                                               {"path": str(b), "weight": 2, "temperature": 0.7}]}))
    result = export_onnx(manifest, out=tmp_path / "out")
    assert "different inputs" in result.split_reason
    assert [f.input_shape for f in result.files] == [[BATCH_AXIS, 3, 16, 16], [BATCH_AXIS, 1, 20, 20]]
    doc = json.loads(result.manifest.read_text())
    assert [m["path"] for m in doc["models"]] == ["member0.onnx", "member1.onnx"]
    assert doc["combine"] == "weighted" and doc["temperature_in_graph"] is True
    assert [m["weight"] for m in doc["models"]] == pytest.approx([1 / 3, 2 / 3])
    # each member file is that member at its temperature
    x = images(3, 20, channels=1)
    predictor = EnsemblePredictor([b], **FP32_IDENTITY, temperatures=[0.7])
    np.testing.assert_allclose(onnx_probs(result.manifest.parent / "member1.onnx", x), torch_probs(predictor, x),
                               atol=TOLERANCE, rtol=0)


def test_resnet18_exports_with_a_dynamic_batch(tmp_path):
    path = save_model(tmp_path / "r18", "resnet18", 32, seed=7)
    (f,) = export_onnx(path).files
    assert f.input_shape == [BATCH_AXIS, 3, 32, 32] and f.max_diff <= TOLERANCE
    predictor = EnsemblePredictor([path], **FP32_IDENTITY)
    for n in (1, 5):
        x = images(n, 32, seed=n)
        np.testing.assert_allclose(onnx_probs(f.path, x), torch_probs(predictor, x), atol=TOLERANCE, rtol=0)


def test_the_check_refuses_a_graph_whose_batch_is_fixed(lenet, tmp_path):
    """What an export without dynamic_shapes gives: every input dimension fixed at the example's."""
    run, result = lenet
    predictor = EnsemblePredictor([run / "model.pt"], **FP32_IDENTITY)
    fixed = tmp_path / "fixed.onnx"
    graph = onnx_export.ProbabilityGraph(predictor.members, weighted=False).eval()
    torch.onnx.export(graph, (torch.zeros(2, 3, 16, 16, dtype=torch.uint8),), dynamo=True, input_names=["images"],
                      output_names=["probabilities"], opset_version=onnx_export.OPSET, verbose=False).save(fixed)
    f = onnx_export.ExportedFile(fixed, list(predictor.members), (16, 3))
    with pytest.raises(JobFailed, match=r"fixed.onnx: the batch axis is fixed at 2"):
        check_files(predictor, [f], combined=True)


def test_the_check_fails_naming_the_file_when_onnx_and_torch_disagree(lenet):
    """The lenet file against a predictor at another temperature: probabilities apart by far more than 1e-4."""
    run, result = lenet
    predictor = EnsemblePredictor([run / "model.pt"], **FP32_IDENTITY, temperatures=[0.2])
    f = onnx_export.ExportedFile(result.files[0].path, list(predictor.members), (16, 3))
    with pytest.raises(JobFailed, match=r"lenet_run\.onnx: ONNX Runtime and PyTorch differ by .* \(> 0\.0001\)"):
        check_files(predictor, [f], combined=True)


def test_cli_export_prints_the_file_and_its_check(lenet, tmp_path, capsys):
    run, _ = lenet
    assert main(["export", "--models", str(run / "model.pt"), "--format", "onnx", "--out", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert f"{tmp_path / 'lenet_run.onnx'}  " in out and "opset 18" in out
    assert "uint8 [batch, 3, 16, 16] (batch is dynamic)" in out and "check: ONNX Runtime vs PyTorch" in out
    assert "TTA views are not exported" in err
    assert (tmp_path / "lenet_run.onnx").is_file()


@pytest.mark.parametrize("args, message", [
    (["--models", "{tmp}/none"], "{tmp}/none: no model file"),
    (["--models", "{tmp}/none.json"], "{tmp}/none.json: no such ensemble manifest"),
    (["--models", "{model}", "--format", "tflite"], "--format: unknown format 'tflite'; supported: onnx"),
])
def test_cli_errors_are_one_line_and_exit_2(tmp_path, capsys, args, message):
    model = save_model(tmp_path / "m", "lenet5", 16)
    fill = {"tmp": tmp_path, "model": model}
    assert main(["export", *(a.format(**fill) for a in args)]) == 2
    out, err = capsys.readouterr()
    assert err.startswith("imgcls-dist export: error: ") and err.count("\n") == 1, err
    assert message.format(**fill) in err
    assert out == ""


def test_without_onnxruntime_the_error_says_what_to_install(monkeypatch, tmp_path):
    import imgcls_dist.predictor.onnx_runtime as runtime

    real = runtime.importlib.util.find_spec
    monkeypatch.setattr(runtime.importlib.util, "find_spec", lambda m: None if m == "onnxruntime" else real(m))
    with pytest.raises(UserError, match=r"ONNX export needs onnxruntime, not installed: "
                                        r"pip install 'imgcls-dist\[onnx\]'"):
        export_onnx(save_model(tmp_path / "m", "lenet5", 16))
    with pytest.raises(UserError, match=r"--backend onnxruntime needs onnxruntime, not installed"):
        EnsemblePredictor([save_model(tmp_path / "m", "lenet5", 16)], backend="onnxruntime")



def test_a_vote_ensemble_is_not_one_graph(tmp_path):
    """A vote counts each member's argmax: no sum of probabilities a single graph could compute smoothly."""
    a = save_model(tmp_path / "a", "lenet5", 16)
    predictor = EnsemblePredictor([a, a], combine="vote", **FP32_IDENTITY)
    assert "vote" in onnx_export.split_reason(predictor)
    assert onnx_export.split_reason(EnsemblePredictor([a, a], **FP32_IDENTITY)) == ""


def test_an_exporter_failure_is_one_line_naming_the_file(monkeypatch, tmp_path):
    def fail(*a, **k):
        raise RuntimeError("Unsupported operator aten::weird\n\n(pages of trace)")

    monkeypatch.setattr(torch.onnx, "export", fail)
    with pytest.raises(JobFailed, match=r"m\.onnx: the ONNX exporter failed \(RuntimeError: Unsupported operator "
                                        r"aten::weird\)$"):
        export_onnx(save_model(tmp_path / "m", "lenet5", 16))
