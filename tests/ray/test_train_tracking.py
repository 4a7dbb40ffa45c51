"""`run.tracking: mlflow` for `train`, end to end on the shared 2-CPU Ray against a real `mlflow server`
(tests/conftest.py). The campaign's parent and trial runs: test_tune_campaign.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from helpers.ray_procs import sigterm_when

from imgcls_dist.config import load_config, write_config
from imgcls_dist.errors import Stopped
from imgcls_dist.tracking.params import flatten
from imgcls_dist.train.job import run_training

pytestmark = pytest.mark.e2e
EPOCH_METRICS = ("train_loss", "train_acc", "val_loss", "val_acc", "lr", "images_per_s")
ARTIFACTS = {"config.yaml", "metrics.csv", "model.pt", "training_history.png", "confusion_matrix.png",
             "classification_report.txt"}


def _steps(client, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def _stop_in_second_epoch(ray_session, cfg, tmp_path) -> None:
    """`imgcls-dist train` in its own process (joined to the shared Ray), SIGTERMed once epoch 1 is done. The
    console line reaches the log a second or more late on a loaded machine: with 4 short epochs the request still
    lands before the last one ends."""
    write_config(cfg, tmp_path / "tracked.yaml")
    log = tmp_path / "stopped.log"
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    cmd = [sys.executable, "-m", "imgcls_dist.cli", "train", "--config", str(tmp_path / "tracked.yaml")]
    proc = subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    sigterm_when(proc, lambda: "epoch 1/4 " in log.read_text(), log, timeout_s=300, exit_timeout_s=120)
    assert proc.returncode == Stopped.exit_code, log.read_text()[-3000:]


def test_a_stopped_and_resumed_run_is_one_mlflow_run_with_every_epoch_once(ray_session, mlflow_server,
                                                                            tiny_digits_dir, tmp_path, monkeypatch):
    """Two workers; SIGTERM after epoch 1: the MLflow run holds the epochs done (logged by the Train controller as
    each ended) and is KILLED. The same command again continues that run (the id in the run directory): it ends
    FINISHED with the resolved config as dotted params, each epoch's metrics once (steps 0-3), the test
    metrics and copies of the run's files. The shared Ray started before MLFLOW_TRACKING_URI was set: the
    controller reaches the server only through the settings the driver hands it."""
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "train-e2e")
    cfg = load_config(None, [
        f"data.path={tiny_digits_dir}", "data.image_size=16", "data.batch_size=2", "data.loader_workers=0",
        "model.arch=lenet5", "train.epochs=4", "train.optimizer=adamw", "train.lr=0.003", "run.name=tracked",
        f"run.storage_path={tmp_path / 'runs'}", "scaling.num_workers=2", "run.tracking=mlflow"])
    run_dir = tmp_path / "runs" / "tracked"
    _stop_in_second_epoch(ray_session, cfg, tmp_path)
    client = MlflowClient(mlflow_server.uri)
    run_id = json.loads((run_dir / "mlflow_run.json").read_text())["run_id"]
    assert client.get_run(run_id).info.status == "KILLED"
    logged = _steps(client, run_id, "val_acc")
    assert logged in ([0], [0, 1], [0, 1, 2]), logged  # the epochs done before the stop

    res = run_training(cfg)
    assert json.loads((run_dir / "mlflow_run.json").read_text())["run_id"] == run_id
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "tracked"
    assert run.data.tags["imgcls.run_dir"] == str(run_dir)
    assert client.get_experiment(run.info.experiment_id).name == "train-e2e"
    assert run.data.params == flatten(load_config(run_dir / "config.yaml", []).to_dict())
    assert run.data.params["train.lr"] == "0.003" and run.data.params["scaling.num_workers"] == "2"
    for key in EPOCH_METRICS:
        assert _steps(client, run_id, key) == [0, 1, 2, 3], key
    assert [m.value for m in sorted(client.get_metric_history(run_id, "val_acc"), key=lambda m: m.step)] == \
        pytest.approx([h["val_acc"] for h in res["history"]])
    assert run.data.metrics["test_acc"] == pytest.approx(res["test_acc"])
    assert ARTIFACTS <= {a.path for a in client.list_artifacts(run_id)}
