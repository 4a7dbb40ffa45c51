"""`register` of an ONNX file from `imgcls-dist export` against a real `mlflow server` (tests/conftest.py,
`mlflow_server`): MLflow's onnx flavor with its signature and pinned requirements, probabilities those of our
predictor; `models:/` of it refused in one line by predict; several ONNX files, or one not written by the export,
refused before anything is registered."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers.model_files import DIGITS, save_model

from imgcls_dist.cli import main
from imgcls_dist.predictor.predictor import EnsemblePredictor
from imgcls_dist.tracking.registry import CACHE_ENV

mlflow = pytest.importorskip("mlflow")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

NAME = "digits-onnx"


@pytest.fixture(scope="module")
def registered(mlflow_server, tmp_path_factory):
    """A lenet exported to ONNX (the export's first call costs seconds: once per module) and registered as NAME
    through the CLI."""
    from imgcls_dist.export.onnx_export import export_onnx

    model = save_model(tmp_path_factory.mktemp("onnx_registry") / "lenet", "lenet5", 16, seed=3)
    (exported,) = export_onnx(model).files
    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(printed):
        mp.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
        assert main(["register", "--models", str(exported.path), "--name", NAME]) == 0
    return SimpleNamespace(model=model, onnx=exported.path, printed=printed.getvalue().splitlines())


@pytest.fixture
def env(mlflow_server, monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))


def test_the_onnx_version_has_its_signature_and_our_probabilities(registered, env):
    from mlflow.types import TensorSpec

    assert registered.printed == [f"registered {NAME} version 1 (models:/{NAME}/1)"]
    loaded = mlflow.pyfunc.load_model(f"models:/{NAME}/1")
    assert loaded.metadata.flavors.keys() >= {"onnx", "python_function"}
    (inp,), (out,) = loaded.metadata.signature.inputs.inputs, loaded.metadata.signature.outputs.inputs
    assert isinstance(inp, TensorSpec) and (inp.name, inp.type, inp.shape) == ("images", np.dtype(np.uint8),
                                                                                (-1, 3, 16, 16))
    assert (out.name, out.type, out.shape) == ("probabilities", np.dtype(np.float32), (-1, 10))
    x = np.random.default_rng(0).integers(0, 256, (5, 3, 16, 16), dtype=np.uint8)
    got = loaded.predict(x)["probabilities"]
    ours = EnsemblePredictor([registered.model], views="none", device="cpu", precision="fp32")
    np.testing.assert_allclose(got, ours.predict_uint8({(16, 3): torch.from_numpy(x)}), rtol=0, atol=1e-5)
    # the graph as exported, metadata included: one file, the weights inside
    graph = mlflow.onnx.load_model(f"models:/{NAME}/1")
    assert json.loads({p.key: p.value for p in graph.metadata_props}["classes"]) == DIGITS
    reqs = open(mlflow.pyfunc.get_model_dependencies(f"models:/{NAME}/1")).read().split()
    assert any(r.startswith("onnxruntime==") for r in reqs) and any(r.startswith("onnx==") for r in reqs)
    assert not any(r.startswith(("torch", "imgcls-dist")) for r in reqs), reqs


def test_predict_of_the_onnx_version_is_one_line_naming_what_runs_it(registered, env, tmp_path, capsys):
    assert main(["predict", str(tmp_path / "any.png"), "--models", f"models:/{NAME}/1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert f"models:/{NAME}/1: an ONNX model" in err and "onnxruntime" in err and "mlflow.pyfunc" in err, err
    assert not (tmp_path / "cache").exists()  # refused before any download


def test_several_onnx_files_or_a_foreign_one_are_refused_before_registering(registered, env, tmp_path, capsys):
    members = tmp_path / "lenet-onnx"  # what export writes for an ensemble it cannot make one graph of
    members.mkdir()
    for i in range(2):
        shutil.copy(registered.onnx, members / f"member{i}.onnx")
    (members / "ensemble.json").write_text(json.dumps({
        "models": [{"path": "member0.onnx", "temperature": 1.0}, {"path": "member1.onnx", "temperature": 1.0}],
        "combine": "vote", "format": "onnx", "temperature_in_graph": True}))
    foreign = onnx.load(str(registered.onnx))
    del foreign.metadata_props[:]
    onnx.save(foreign, str(tmp_path / "foreign.onnx"))
    cases = {(str(members / "ensemble.json"),): "several ONNX files cannot be registered as one model",
             (str(members),): "several ONNX files",
             (str(members / "member0.onnx"), str(members / "member1.onnx")): "several ONNX files",
             (str(tmp_path / "foreign.onnx"),): "not an ONNX file written by `imgcls-dist export`"}
    for models, says in cases.items():
        assert main(["register", "--models", *models, "--name", NAME]) == 2
        out, err = capsys.readouterr()
        assert len(err.strip().splitlines()) == 1 and says in err and out == "", err
    assert len(mlflow.MlflowClient().search_model_versions(f"name='{NAME}'")) == 1
