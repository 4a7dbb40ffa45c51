"""The MLflow model registry against a real `mlflow server` (tests/conftest.py, `mlflow_server`): `register` of a
model file and of an ensemble, `predict` from `models:/NAME/VERSION` and `models:/NAME@ALIAS` as from the files,
the download made once, the pyfunc flavor from image bytes, one-line errors; `evaluate --mlflow-run new`."""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers.model_files import DIGITS, save_model

from imgcls_dist.cli import main
from imgcls_dist.data.builtin import digits_images, encode_png
from imgcls_dist.ports import free_port
from imgcls_dist.predictor.predict import load_predictor, predict_images
from imgcls_dist.predictor.prepare import prepare_encoded
from imgcls_dist.tracking.registry import CACHE_ENV, fetch_model

mlflow = pytest.importorskip("mlflow")

MANIFEST = {"models": [{"path": "a", "weight": 2, "temperature": 1.5}, {"path": "b", "weight": 1, "temperature": 0.8}],
            "combine": "weighted", "views": ["identity", "shift_left"]}


@pytest.fixture(scope="module")
def registered(mlflow_server, tmp_path_factory):
    """A model file registered as digits-lenet (alias champion) and a two-member ensemble as digits-ensemble,
    through the CLI; with 3 digit PNGs to predict."""
    d = tmp_path_factory.mktemp("registry")
    model = save_model(d / "a", "lenet5", 16, seed=1)
    save_model(d / "b", "lenet5", 24, seed=2)
    (d / "ensemble.json").write_text(json.dumps(MANIFEST))
    pngs = []
    for i, img in enumerate(digits_images(16)[0][:3]):
        pngs.append(d / f"digit{i}.png")
        pngs[-1].write_bytes(encode_png(img))
    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(printed):
        mp.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
        for argv in (["--models", str(model), "--name", "digits-lenet", "--alias", "champion"],
                     ["--models", str(d / "ensemble.json"), "--name", "digits-ensemble"]):
            assert main(["register", *argv]) == 0
    return SimpleNamespace(model=model, manifest=d / "ensemble.json", pngs=pngs,
                           printed=printed.getvalue().splitlines())


@pytest.fixture
def env(mlflow_server, monkeypatch, tmp_path):
    """This test's server, and a cache of its own (empty)."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))


def count_downloads(monkeypatch) -> list[str]:
    calls: list[str] = []
    real = mlflow.artifacts.download_artifacts

    def counted(*args, **kwargs):
        calls.append(kwargs.get("artifact_uri", ""))
        return real(*args, **kwargs)

    monkeypatch.setattr(mlflow.artifacts, "download_artifacts", counted)
    return calls


def test_registered_model_predicts_as_its_file_and_is_downloaded_once(registered, env, monkeypatch, capsys):
    r = registered
    downloads = count_downloads(monkeypatch)
    printed = {}
    for models in (str(r.model), "models:/digits-lenet/1", "models:/digits-lenet@champion"):
        assert main(["predict", *map(str, r.pngs), "--models", models, "--topk", "10"]) == 0
        printed[models] = capsys.readouterr().out
    assert len(set(printed.values())) == 1, printed
    assert len(downloads) == 1  # the alias resolved to version 1, already in the cache
    assert predict_images(r.pngs, "models:/digits-lenet/1", topk=10) == predict_images(r.pngs, r.model, topk=10)
    assert len(downloads) == 1


def test_registration_prints_the_version_and_a_killed_download_is_not_taken_as_done(registered, env, tmp_path,
                                                                                    monkeypatch, capsys):
    r = registered
    assert r.printed == ["registered digits-lenet version 1 (models:/digits-lenet/1), alias champion "
                         "(models:/digits-lenet@champion)",
                         "registered digits-ensemble version 1 (models:/digits-ensemble/1)"]
    assert main(["register", "--models", str(r.model), "--name", "digits-lenet"]) == 0
    assert capsys.readouterr().out.strip() == "registered digits-lenet version 2 (models:/digits-lenet/2)"

    with pytest.MonkeyPatch.context() as m:
        def killed(*args, dst_path, **kwargs):  # part of the files written, then the process killed
            (Path(dst_path) / "model").mkdir(parents=True)
            (Path(dst_path) / "model" / "model.pt").write_bytes(b"half a file")
            m.setattr(shutil, "rmtree", lambda *a, **k: None)  # a killed process cleans nothing up
            raise ConnectionError("connection reset")

        m.setattr(mlflow.artifacts, "download_artifacts", killed)
        assert main(["predict", str(r.pngs[0]), "--models", "models:/digits-lenet/2"]) == 2
    assert "cannot download" in capsys.readouterr().err
    left = [p.relative_to(tmp_path / "cache") for p in (tmp_path / "cache").rglob("model.pt")]
    assert len(left) == 1 and left[0].parts[-3].startswith(".partial-2-"), left  # beside, never as, version 2
    assert predict_images(r.pngs, "models:/digits-lenet/2") == predict_images(r.pngs, r.model)


def test_registered_ensemble_is_self_contained_and_predicts_as_its_manifest(registered, env, tmp_path):
    r = registered
    local = Path(fetch_model("models:/digits-ensemble/1"))
    doc = json.loads((local / "ensemble.json").read_text())
    assert [m["path"] for m in doc["models"]] == ["members/00/model.pt", "members/01/model.pt"]
    assert {k: v for k, v in doc.items() if k != "models"} == {k: v for k, v in MANIFEST.items() if k != "models"}
    moved = shutil.copytree(local, tmp_path / "moved")  # nothing in it points outside it
    want = predict_images(r.pngs, r.manifest, topk=10)
    assert predict_images(r.pngs, moved, topk=10) == want
    assert predict_images(r.pngs, "models:/digits-ensemble/1", topk=10) == want


def test_pyfunc_flavor_gives_our_probabilities_for_image_bytes(registered, env):
    import pandas as pd
    from mlflow.types import DataType

    r = registered
    loaded = mlflow.pyfunc.load_model("models:/digits-ensemble/1")
    sig = loaded.metadata.signature
    assert sig.inputs.input_names() == ["image"] and sig.inputs.input_types() == [DataType.binary]
    assert sig.outputs.input_names() == [*DIGITS, "error"]
    images = [p.read_bytes() for p in r.pngs]
    got = loaded.predict(pd.DataFrame({"image": images + [b"not an image"]}))
    ours = load_predictor(str(r.manifest))
    want = ours.predict_uint8(prepare_encoded(images, ours.input_keys)[0])
    np.testing.assert_allclose(got[DIGITS].to_numpy()[:3], want, rtol=0, atol=1e-6)
    assert got["error"][:3].isna().all() and isinstance(got["error"][3], str)
    assert np.isnan(got[DIGITS].to_numpy()[3]).all()


def test_bad_uri_unknown_model_and_down_server_are_one_line_errors(registered, env, monkeypatch, capsys):
    png = str(registered.pngs[0])
    cases = {"models:/no-such-model/1": "no-such-model", "models:/digits-lenet/99": "version 99",
             "models:/digits-lenet@nope": "alias 'nope'", "models:/digits-lenet": "models:/NAME/VERSION"}
    for uri, says in cases.items():
        assert main(["predict", png, "--models", uri]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and uri in err and says in err, err
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    for argv in (["predict", png, "--models", "models:/digits-lenet/1"],
                 ["register", "--models", str(registered.model), "--name", "x"]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "cannot be used" in err, err
    monkeypatch.setitem(sys.modules, "mlflow", None)  # MLflow not installed
    assert main(["predict", png, "--models", "models:/digits-lenet/1"]) == 2
    assert "pip install 'imgcls-dist[mlflow]'" in capsys.readouterr().err


def write_predictions(out, y_true: list[int], y_pred: list[int]) -> None:
    """A predictions directory as infer publishes it, as far as evaluate reads it."""
    out.mkdir()
    n = len(y_true)
    t = pa.table({"id": [str(i) for i in range(n)], "pred": pa.array(y_pred, pa.int32()),
                  "probs": pa.array([[0.1] * 10] * n, pa.list_(pa.float32())), "label": pa.array(y_true, pa.int64()),
                  "error": pa.array([None] * n, pa.string())})
    pq.write_table(t, out / "part-0.parquet")
    (out / "_manifest.json").write_text(json.dumps({"complete": True, "classes": DIGITS, "models": [],
                                                    "files": [{"name": "part-0.parquet", "rows": n}]}))


def test_evaluate_logs_its_metrics_and_report_files_to_a_new_run(env, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    out = tmp_path / "preds"
    write_predictions(out, [i % 10 for i in range(20)], [i % 10 if i < 15 else 0 for i in range(20)])
    assert main(["evaluate", str(out), "--mlflow-run", "0123456789abcdef"]) == 2  # refused before any work
    assert "no MLflow run '0123456789abcdef'" in capsys.readouterr().err and not (out / "eval").exists()
    assert main(["evaluate", str(out), "--mlflow-run", "new"]) == 0
    run_id = re.search(r"evaluate: logged to a new MLflow run (\w+)", capsys.readouterr().out)[1]
    c = MlflowClient()
    run = c.get_run(run_id)
    assert run.info.status == "FINISHED"
    written = json.loads((out / "eval" / "metrics.json").read_text())
    assert written["accuracy"] == pytest.approx(15 / 20)
    assert {k: v for k, v in run.data.metrics.items()} == pytest.approx(
        {f"evaluate/{k}": written[k] for k in ("accuracy", "balanced_accuracy", "evaluated_rows", "error_rows",
                                               "unlabeled_rows")})
    assert sorted(a.path for a in c.list_artifacts(run_id, "evaluate")) == [
        "evaluate/classification_report.txt", "evaluate/confusion_matrix.png", "evaluate/metrics.json"]
