"""MLflow tracking without Ray: config params as MLflow takes them, the preflight of a job whose server is down,
and metrics that outlive the server going away (the suite's `mlflow server` behind a forwarder that stops and
starts again)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from helpers.tcp_proxy import TcpProxy

from imgcls_dist.config import load_config
from imgcls_dist.ports import free_port
from imgcls_dist.tracking.logger import Notice, RunLogger
from imgcls_dist.tracking.params import MAX_PARAMS_PER_BATCH, MAX_VALUE_LENGTH, batches, flatten

ROOT = Path(__file__).parents[2]


def test_a_config_flattens_to_dotted_params_within_mlflows_limits():
    flat = flatten({"train": {"lr": 0.003, "progressive_resizing": [[1, 16]], "teacher": None, "ema": True},
                    "tune": {"space": {}}, "run": {"name": "x" * (MAX_VALUE_LENGTH + 10)},
                    "study": {"arms": {"strong+mix": {"augment.preset": "strong"}}}})
    assert flat["train.lr"] == "0.003" and flat["train.progressive_resizing"] == "[[1, 16]]"
    assert flat["train.teacher"] == "null" and flat["train.ema"] == "true"
    assert flat["tune.space"] == "{}"  # an empty section is still a visible param
    assert flat["study.arms.strong_mix.augment.preset"] == "strong"  # a user's name, in characters MLflow takes
    assert len(flat["run.name"]) == MAX_VALUE_LENGTH and flat["run.name"].endswith("...")
    cfg = load_config(ROOT / "configs" / "lenet5_digits.yaml", []).to_dict()
    params = flatten(cfg)
    assert params["model.arch"] == "lenet5" and params["train.lr"] == str(cfg["train"]["lr"])
    assert len(params) >= sum(len(section) for section in cfg.values())  # every key, nested sections' leaves too
    # A log_batch request takes at most 100 params (a config with a search space or study arms has more).
    assert [len(b) for b in batches({f"p{i}": "v" for i in range(250)})] == [MAX_PARAMS_PER_BATCH] * 2 + [50]


def test_a_job_whose_tracking_server_is_down_stops_before_any_work_with_one_line(tmp_path):
    """`imgcls-dist train` with run.tracking=mlflow and nothing listening at MLFLOW_TRACKING_URI: exit 2, one
    line naming the server, before any work (no run directory, no Ray)."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}"}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "imgcls_dist.cli", "train", "--config", str(ROOT / "configs" / "lenet5_digits.yaml"),
           "--set", "run.tracking=mlflow", "--set", f"run.storage_path={tmp_path / 'runs'}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("imgcls-dist train: error: run.tracking=mlflow: the MLflow "
                                                   f"tracking server at {env['MLFLOW_TRACKING_URI']} cannot be used")
    assert proc.stdout == "" and not (tmp_path / "runs").exists()


def _steps(client, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def test_metrics_outlive_the_server_going_away_and_the_loss_is_said_once(mlflow_server, tmp_path, capsys,
                                                                         monkeypatch):
    """Epoch 0 is logged; the server goes away; epochs 1 and 2 are kept and the loss is said once, also by a second
    logger of the same command (another process: the Train controller beside the driver); the server comes back
    on its port and the next epoch brings the kept ones along, each step once. (The server "goes away" as a
    forwarder in front of the suite's server stops: connections cut, then refused.)"""
    from mlflow.tracking import MlflowClient

    proxy = TcpProxy(int(mlflow_server.uri.rsplit(":", 1)[1])).start()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", proxy.url)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # a dead server answers at once
    client = MlflowClient(mlflow_server.uri)
    run_id = client.create_run("0").info.run_id
    notice = Notice(str(tmp_path / "notice"))
    log = RunLogger(run_id, "RUN_DIR", notice)
    try:
        assert log.log_step(0, {"val_acc": 0.5, "lr": 0.1})
        proxy.stop()
        assert not log.log_step(1, {"val_acc": 0.6, "lr": 0.1})
        assert not log.log_step(2, {"val_acc": 0.7, "lr": 0.1})
        other = RunLogger(run_id, "RUN_DIR", Notice(notice.file, notice.token))  # same command, another process
        assert not other.log_step(2, {"val_acc": 0.7, "lr": 0.1})
        err = capsys.readouterr().err
        assert err.count("warning: MLflow") == 1 and "the run's files in RUN_DIR stay complete" in err
        assert sorted(log.pending) == [1, 2]
        proxy.start()  # back on its port
        assert log.log_step(3, {"val_acc": 0.8, "lr": 0.1}) and other.flush()  # other: step 2 is there already
        assert _steps(client, run_id, "val_acc") == _steps(client, run_id, "lr") == [0, 1, 2, 3]
        assert capsys.readouterr().err == ""
    finally:
        proxy.stop()
