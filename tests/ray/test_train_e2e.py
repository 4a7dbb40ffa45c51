"""End-to-end training on the shared 2-CPU local Ray: tiny data, real TorchTrainer + accelerate."""

from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch
from helpers.local_train import fit_in_process
from helpers.ray_procs import ray_worker_processes, sigterm_when
from helpers.model_files import save_model, save_nan_model

from imgcls_dist.config import load_config, write_config
from imgcls_dist.errors import JobFailed, Stopped, UserError
from imgcls_dist.data.shards import read_rows
from imgcls_dist.models.checkpoint import load_model_file
from imgcls_dist.tracking.params import flatten
from imgcls_dist.tracking.runs import RUN_ID_FILE
from imgcls_dist.train.job import build_trainer, resolve_dataset, run_training

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).parents[2]


def tiny_cfg(data_dir, tmp_path, name="t", arch="lenet5", extra=()):
    return load_config(None, [
        f"data.path={data_dir}", "data.image_size=16", "data.batch_size=32", "data.loader_workers=0",
        f"model.arch={arch}", "train.epochs=2", "train.optimizer=adamw", "train.lr=0.003", "train.scheduler=cosine",
        "augment.preset=light", f"run.name={name}", f"run.storage_path={tmp_path / 'runs'}", "scaling.num_workers=1",
        *extra])


def n_train(data_dir) -> int:
    return json.loads((Path(data_dir) / "dataset.json").read_text())["counts"]["train"]


def _tiny_cli_train(data: Path, storage: Path, name: str, *extra: str) -> list[str]:
    cmd = ["train", "--config", str(ROOT / "configs/lenet5_digits.yaml")]
    for s in [f"data.path={data}", "data.loader_workers=0", "scaling.num_workers=1", f"run.storage_path={storage}",
              f"run.name={name}", *extra]:
        cmd += ["--set", s]
    return cmd


@pytest.fixture(scope="module")
def no_test_split(tmp_path_factory) -> Path:
    from imgcls_dist.data.ingest import ingest

    data = tmp_path_factory.mktemp("no_test") / "d"
    ingest("builtin:digits", data, image_size=16, fractions=(0.9, 0.1, 0.0), rows_per_shard=200)
    return data


@pytest.mark.own_ray
def test_a_plain_train_command_has_a_clean_console_every_artifact_and_resizes_progressively(no_test_split, tmp_path):
    """`imgcls-dist train` as a user runs it (its own local Ray, nothing shared with the suite): our lines,
    no Train placement-group-cleaner warnings, no token-auth notice, no traceback; every artifact, the LR
    schedule and the progressive-resizing phases. The dataset has no test rows: one note, no report (the
    report itself: the all-S3 workflow's train step, test_s3_e2e.py)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    cmd = [sys.executable, "-m", "imgcls_dist.cli", *_tiny_cli_train(
        no_test_split, tmp_path, "console", "train.epochs=4", "train.warmup_epochs=1", "data.image_size=24",
        "data.max_train_samples=320", "train.progressive_resizing=[[1, 16], [3, 20]]")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    console = proc.stdout + proc.stderr
    assert proc.returncode == 0, console[-3000:]
    assert "epoch 4/4" in console and "run directory:" in console
    assert "has no test rows: no test report" in proc.stdout
    for noise in ("placement_group_cleaner", "Failed to query Ray Train Controller", "Token authentication is enabled",
                  "Reporting training result", "Traceback"):
        assert noise not in console, (noise, console[-3000:])
    run = tmp_path / "console"
    for f in ("config.yaml", "metrics.csv", "training_history.png", "model.pt", "summary.json"):
        assert (run / f).is_file(), f
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert not (run / "classification_report.txt").exists()
    hist = list(csv.DictReader((run / "metrics.csv").open()))
    assert [int(h["epoch"]) for h in hist] == [0, 1, 2, 3]
    assert all(int(h["train_samples"]) == int(h["unique_samples"]) == 320 for h in hist)
    assert float(hist[-1]["train_loss"]) < float(hist[0]["train_loss"])
    # warmup (factor 0.1) then cosine over the remaining 3 epochs, stepped per epoch
    assert [float(h["lr"]) for h in hist] == pytest.approx([0.0003, 0.003, 0.00225, 0.00075], rel=1e-6)
    assert [int(h["image_size"]) for h in hist] == [24, 16, 16, 20]  # the phases, at their planned epochs
    m = load_model_file(run / "model.pt")  # weights_only load of plain types
    assert m["arch"] == "lenet5" and m["classes"] == [str(i) for i in range(10)]
    assert m["image_size"] == 24  # validation/export size, whatever the training phase
    assert m["config"]["train"]["epochs"] == 4 and m["hflip"] is False
    summary = json.loads((run / "summary.json").read_text())
    assert summary["epochs"] == 4 and summary["train_rows"] == 320
    assert summary["model_mb"] == pytest.approx((run / "model.pt").stat().st_size / 2**20, abs=1e-3)
    assert 0 < summary["trainable_params"] <= sum(t.numel() for t in m["state_dict"].values())
    assert 1 <= summary["epochs_to_95pct_best"] <= summary["epochs_to_99pct_best"] <= 4
    assert summary["images_per_s"] > 0
    # a worker's peak: at least the resident size of a process that imported torch, never more than the machine
    peak = summary["peak_rss_mb"]
    assert 100 < peak == max(float(h["peak_rss_mb"]) for h in hist) < psutil.virtual_memory().total / 2**20
    assert summary["peak_gpu_mb"] == 0.0  # a CPU run


def _latest_registered_step(run_dir: Path) -> int | None:
    """The `step` of the latest checkpoint Train has registered (its snapshot), None while there is none."""
    try:
        snap = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
        name = snap["latest_checkpoint_result"]["checkpoint_dir_name"]
        return int(torch.load(run_dir / name / "train_state.pt", weights_only=True)["step"])
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, EOFError):
        return None


# Two workers, batches of 2 (90 a worker per epoch: long enough an epoch for a stop request or a kill to land
# inside it), an EMA of the weights (its average and warm-up position resume with the rest).
TWO_WORKERS = ["train.epochs=2", "scaling.num_workers=2", "data.batch_size=2", "train.ema_decay=0.9"]


@pytest.fixture(scope="module")
def uninterrupted(ray_session, tiny_digits_dir, tmp_path_factory) -> dict:
    """The TWO_WORKERS run without interruption: what every interrupted-and-resumed run must end as."""
    return run_training(tiny_cfg(tiny_digits_dir, tmp_path_factory.mktemp("clean"), name="clean", extra=TWO_WORKERS),
                        report_test=False)


def _same_run(res: dict, clean: dict) -> None:
    """Every random stream is a function of (seed, epoch, rank, step / sample): a resumed run is the
    uninterrupted one, bit for bit (raw weights and their moving average)."""
    for key in ("lr", "train_loss", "ema_val_loss"):
        assert [h[key] for h in res["history"]] == [h[key] for h in clean["history"]], key
    resumed, uninterrupted = (load_model_file(Path(r["model"]))["state_dict"] for r in (res, clean))
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)


def _kill_a_train_worker_mid_epoch(run_dir: Path, killed: dict, timeout_s: float = 240) -> None:
    """From outside the run, as a crash would: SIGKILL a Train worker process of our Ray node as soon as
    Train has registered a mid-epoch checkpoint."""
    deadline = time.time() + timeout_s
    while time.time() < deadline and not _latest_registered_step(run_dir):
        time.sleep(0.05)
    while time.time() < deadline:
        workers = ray_worker_processes("RayTrainWorker")
        if workers:
            killed["pid"] = workers[0].pid
            os.kill(workers[0].pid, signal.SIGKILL)
            return
        time.sleep(0.05)


def test_two_workers_killed_mid_epoch_resume_at_the_first_unseen_sample(ray_session, mlflow_server, tiny_digits_dir,
                                                                         uninterrupted, tmp_path, capfd, monkeypatch):
    """Two workers, checkpoints every 20 steps (an epoch is 90 batches per worker); a worker is killed once
    Train has registered a mid-epoch checkpoint: Train restarts the group, which resumes inside that epoch,
    trains every sample exactly once across the kill (split evenly between the workers), and ends with the
    weights of an uninterrupted run (which checkpointed only at epoch ends), bit for bit. Tracked in MLflow: one
    run, every epoch logged once across the restart."""
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")  # Train registers checkpoints as it polls
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    cfg = tiny_cfg(tiny_digits_dir, tmp_path, name="fault", extra=[
        *TWO_WORKERS, "train.checkpoint_every_steps=20", "run.max_failures=2", "run.tracking=mlflow"])
    killed: dict = {}
    killer = threading.Thread(target=_kill_a_train_worker_mid_epoch, args=(tmp_path / "runs" / "fault", killed),
                              daemon=True)
    killer.start()
    res = run_training(cfg, report_test=False)
    killer.join()
    assert killed.get("pid") and not psutil.pid_exists(killed["pid"])  # the worker really died mid-run
    resumed_at = re.search(r"resuming at epoch (\d)/2, batch (\d+)/(\d+)", capfd.readouterr().out)
    assert resumed_at and 1 < int(resumed_at.group(2)) < int(resumed_at.group(3))  # inside an epoch
    hist, n = res["history"], n_train(tiny_digits_dir)
    assert [h["epoch"] for h in hist] == [0, 1]
    client = MlflowClient(mlflow_server.uri)
    run_id = json.loads((tmp_path / "runs" / "fault" / RUN_ID_FILE).read_text())["run_id"]
    for key in ("val_acc", "train_loss"):  # logged by the Train controller, which outlives the worker group
        assert _steps(client, run_id, key) == [0, 1], key
    assert client.get_run(run_id).info.status == "FINISHED"
    for h in hist:  # per sample: exactly once per epoch, across the kill, evenly between the workers
        assert h["world_size"] == 2 and h["train_samples"] == h["unique_samples"] == n
        assert sum(h["worker_samples"]) == n and abs(h["worker_samples"][0] - h["worker_samples"][1]) <= 1
    exported = load_model_file(Path(res["model"]))["metrics"]["ema_weights"]
    assert res["exported_weights"] == ("ema" if exported else "raw")  # summary.json says which weights model.pt holds
    _same_run(res, uninterrupted)


def _sigterm_mid_epoch(ray_session, cfg, tmp_path) -> tuple[int, int, int]:
    """`imgcls-dist train --config <cfg>` in its own process, SIGTERMed once its Train workers run: it must exit
    143 within the grace, after a checkpoint inside an epoch; (that epoch, batch, the epoch's batches). The signal
    is sent on the workers' processes, not on a console line: a worker's line reaches the driver's log a second
    or more late on a loaded machine, and an epoch of this run lasts about that long."""
    write_config(cfg, tmp_path / "stopped.yaml")
    log = tmp_path / "stopped.log"
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    cmd = [sys.executable, "-m", "imgcls_dist.cli", "train", "--config", str(tmp_path / "stopped.yaml")]
    proc = subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    stop_s = sigterm_when(proc, lambda: "resolved config: " in log.read_text() and ray_worker_processes("RayTrainWorker"),
                          log, timeout_s=300, exit_timeout_s=120)
    text = log.read_text()
    assert proc.returncode == Stopped.exit_code, text[-3000:]
    stopped_at = re.search(r"stop requested: checkpoint at epoch (\d)/2, batch (\d+)/(\d+)\n", text)
    assert stopped_at, text[-3000:]
    epoch, batch, batches = (int(g) for g in stopped_at.groups())
    assert 0 < batch < batches, text[-3000:]  # inside the epoch
    assert text.splitlines()[-1] == (f"imgcls-dist train: stopped: training {cfg.run.name}: SIGTERM: stopped with a "
                                     f"checkpoint at epoch {epoch}/2, batch {batch}; the same command again resumes "
                                     "there")
    assert stop_s < cfg.run.stop_grace_s
    assert not (Path(cfg.run.storage_path) / cfg.run.name / "model.pt").exists()  # a stopped run exports nothing yet
    return epoch, batch, batches


def test_sigterm_checkpoints_mid_epoch_and_the_rerun_ends_as_an_uninterrupted_run(ray_session, mlflow_server,
                                                                                   tiny_digits_dir, uninterrupted,
                                                                                   tmp_path, capsys, monkeypatch):
    """`imgcls-dist train` (two workers) gets SIGTERM while it trains: the workers agree on a batch, checkpoint
    there and the driver exits 143 within the grace, naming the batch. The same command again resumes at the
    next batch, trains every sample of that epoch once, and ends with the weights (raw and moving average) of an
    uninterrupted run, bit for bit. Tracked in MLflow, checked by `_check_tracked_run`."""
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "train-e2e")
    cfg = tiny_cfg(tiny_digits_dir, tmp_path, name="stopped", extra=[*TWO_WORKERS, "run.tracking=mlflow"])
    epoch, batch, batches = _sigterm_mid_epoch(ray_session, cfg, tmp_path)
    client = MlflowClient(mlflow_server.uri)
    run_id = json.loads((tmp_path / "runs" / "stopped" / RUN_ID_FILE).read_text())["run_id"]
    assert client.get_run(run_id).info.status == "KILLED"
    assert _steps(client, run_id, "val_acc") == list(range(epoch - 1))  # the epochs done before the stop

    res = run_training(cfg)
    assert f"resuming at epoch {epoch}/2, batch {batch + 1}/{batches}" in capsys.readouterr().out
    n = n_train(tiny_digits_dir)
    assert [(h["train_samples"], h["unique_samples"]) for h in res["history"]] == [(n, n), (n, n)]
    _check_tracked_run(client, run_id, tmp_path / "runs" / "stopped", res)
    _same_run(res, uninterrupted)


def _steps(client, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def _check_tracked_run(client, run_id: str, run_dir: Path, res: dict) -> None:
    """The rerun continued the stopped run's MLflow run (its id in the run directory) and ended it FINISHED with
    the resolved config as dotted params, each epoch's metrics once (logged by the Train controller, which the
    shared Ray started without MLFLOW_TRACKING_URI: it reaches the server through the settings the driver hands
    it), the test metrics and copies of the run's files."""
    assert json.loads((run_dir / RUN_ID_FILE).read_text())["run_id"] == run_id
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == run_dir.name
    assert run.data.tags["imgcls.run_dir"] == str(run_dir)
    assert client.get_experiment(run.info.experiment_id).name == "train-e2e"
    assert run.data.params == flatten(load_config(run_dir / "config.yaml", []).to_dict())
    assert run.data.params["train.lr"] == "0.003" and run.data.params["scaling.num_workers"] == "2"
    for key in ("train_loss", "train_acc", "val_loss", "val_acc", "lr", "images_per_s"):
        assert _steps(client, run_id, key) == [0, 1], key
    assert [m.value for m in sorted(client.get_metric_history(run_id, "val_acc"), key=lambda m: m.step)] == \
        pytest.approx([h["val_acc"] for h in res["history"]])
    assert run.data.metrics["test_acc"] == pytest.approx(res["test_acc"])
    assert {"config.yaml", "metrics.csv", "model.pt", "training_history.png", "confusion_matrix.png",
            "classification_report.txt"} <= {a.path for a in client.list_artifacts(run_id)}


def test_rerun_after_driver_death_resumes_and_a_broken_test_split_costs_only_the_report(
        ray_session, tiny_digits_dir, tmp_path, capsys):
    """A driver in another process (joined to the same cluster) is killed once Train has recorded a
    checkpoint; rerunning the same run.name + storage_path continues from that checkpoint. The dataset's
    test split has a shard that is not Parquet: the finished run warns, has no report, keeps everything else."""
    data = tmp_path / "d"
    shutil.copytree(tiny_digits_dir, data)
    (data / "test" / "part-99999.parquet").write_bytes(b"not parquet")
    storage = tmp_path / "runs"
    sets = [f"data.path={data}", "data.image_size=16", "train.epochs=6", "train.warmup_epochs=0",
            "run.name=driver", f"run.storage_path={storage}", "scaling.num_workers=1", "data.loader_workers=0"]
    cmd = [sys.executable, "-m", "imgcls_dist.cli", "train", "--config", str(ROOT / "configs/lenet5_digits.yaml")]
    for s in sets:
        cmd += ["--set", s]
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    snapshot = storage / "driver" / "checkpoint_manager_snapshot.json"
    deadline = time.time() + 300
    try:
        while time.time() < deadline and not snapshot.exists() and proc.poll() is None:
            time.sleep(0.2)
        assert snapshot.exists(), "Train never recorded a checkpoint"
    finally:
        proc.kill()
        proc.wait()
    for _ in range(20):  # the controller may be mid-write when the driver dies
        try:
            latest = json.loads(snapshot.read_text())["latest_checkpoint_result"]["checkpoint_dir_name"]
            break
        except (json.JSONDecodeError, KeyError, TypeError):
            time.sleep(0.5)
    done = json.loads((storage / "driver" / latest / "history.json").read_text())
    assert 1 <= len(done) < 6
    capsys.readouterr()
    res = run_training(load_config(ROOT / "configs/lenet5_digits.yaml", sets))
    assert [h["epoch"] for h in res["history"]] == list(range(6))
    assert res["history"][: len(done)] == done  # restored, not retrained

    out, err = capsys.readouterr()
    run = storage / "driver"
    for f in ("config.yaml", "metrics.csv", "training_history.png", "model.pt", "summary.json"):
        assert (run / f).is_file(), f
    assert not (run / "classification_report.txt").exists() and "Traceback" not in out + err
    assert "warning: no test report (" in err and "part-99999.parquet: not a readable Parquet file" in err
    assert "not a readable Parquet" in json.loads((run / "summary.json").read_text())["test_report_error"]


def test_non_finite_loss_stops_with_clear_error_and_no_checkpoint(ray_session, tiny_digits_dir, tmp_path, monkeypatch,
                                                                  fresh_accelerate_state):
    """In the loop run in process, through the driver's own error wrapping (`train.job.fit`); the same error
    from a real Train worker, wrapped by Ray, is the s3 workflow's failing tune trial (its results.csv error)."""
    import ray.train

    from imgcls_dist.train.job import fit

    # A real cause of a diverged run: initial weights that are NaN (a corrupt or diverged checkpoint).
    nan_model = save_nan_model(tmp_path / "nan")
    cfg = tiny_cfg(tiny_digits_dir, tmp_path, name="nan", extra=["train.max_nonfinite_steps=3",
                                                                 f"model.weights={nan_model}"])
    real, reported = ray.train.report, []

    def report(metrics, checkpoint=None, **kw):
        reported.append(checkpoint)
        return real(metrics, checkpoint=checkpoint, **kw)

    monkeypatch.setattr(ray.train, "report", report)
    with pytest.raises(JobFailed, match="non-finite for 3 consecutive steps"):
        fit(build_trainer(cfg, resolve_dataset(cfg), num_workers=0, use_gpu=False))
    assert reported == []  # stopped inside the first epoch: nothing reported, no checkpoint


FAMILY_CONFIGS = sorted((ROOT / "configs").glob("*_digits.yaml"))


@pytest.mark.parametrize("path", FAMILY_CONFIGS, ids=[p.stem for p in FAMILY_CONFIGS])
def test_every_config_family_trains_one_epoch(ray_session, tiny_digits_dir, tmp_path, path, fresh_accelerate_state):
    """Each shipped config through the real training loop, in Ray Train V2's local mode (num_workers=0:
    the same train_loop_per_worker in this process, a fraction of the worker start-up per config; the worker
    path itself is covered by the tests above)."""
    cfg = load_config(path, [f"data.path={tiny_digits_dir}", "train.epochs=1", "train.warmup_epochs=0",
                             "data.max_train_samples=24", "data.max_val_samples=16", "data.batch_size=8",
                             "data.loader_workers=0", f"run.storage_path={tmp_path}"])
    res = build_trainer(cfg, resolve_dataset(cfg), num_workers=0, use_gpu=False).fit()
    m = res.metrics
    assert m["train_samples"] == 24 and m["world_size"] == 1 and m["trainable_params"] > 0
    assert math.isfinite(m["train_loss"]) and math.isfinite(m["val_loss"]) and 0 <= m["val_acc"] <= 1


def _class_subset(src: Path, dst: Path, keep: list[int]) -> Path:
    """A dataset of only `keep` digits, relabelled 0..len(keep)-1 (so 0-4 and 5-9 both have 5 classes)."""
    from imgcls_dist.data.shards import write_shards

    meta = json.loads((src / "dataset.json").read_text())
    for split in ("train", "val", "test"):
        rows = read_rows(sorted((src / split).glob("*.parquet")))
        out = [(i, b, keep.index(int(y))) for i, b, y in zip(rows.ids, rows.images, rows.labels) if int(y) in keep]
        write_shards(out, dst / split)
    meta.update(classes=[str(k) for k in keep], counts={})
    (dst / "dataset.json").write_text(json.dumps(meta))
    return dst


def test_transfer_from_a_0_4_model_file_to_5_9(ray_session, tiny_digits_dir, tmp_path, monkeypatch,
                                               fresh_accelerate_state):
    """A 5-class (digits 0-4) model file fine-tuned on digits 5-9, both transfer modes, in the loop run in
    process. The file is made here (save_model_file, the format every run exports) rather than trained: its
    weights need only differ from a fresh init (another seed than the run's)."""
    from imgcls_dist.models.registry import get_model

    b = _class_subset(tiny_digits_dir, tmp_path / "d59", [5, 6, 7, 8, 9])
    pre = {"model": save_model(tmp_path / "pre.pt", "lenet5", 16, classes=[str(i) for i in range(5)], seed=7)}
    pre_sd = load_model_file(pre["model"])["state_dict"]
    head = ("fc3.weight", "fc3.bias")
    backbone = [k for k in pre_sd if k not in head]
    total = sum(p.numel() for p in get_model("lenet5", 5).parameters())
    head_params = 84 * 5 + 5

    fe_hist, fe_model = fit_in_process(tiny_cfg(b, tmp_path, name="fe", extra=[
        f"model.weights={pre['model']}", "model.transfer=feature_extraction"]), monkeypatch, tmp_path / "fe")
    fe_sd = fe_model["state_dict"]
    assert fe_hist[0]["trainable_params"] == head_params and len(fe_hist) == 2
    assert all(torch.equal(fe_sd[k], pre_sd[k]) for k in backbone)  # loaded and frozen
    assert not torch.equal(fe_sd["fc3.weight"], pre_sd["fc3.weight"])  # head replaced (other classes)

    full_hist, full_model = fit_in_process(tiny_cfg(b, tmp_path, name="full", extra=[
        f"model.weights={pre['model']}", "model.transfer=full", "train.lr=1e-7", "train.epochs=1"]), monkeypatch,
        tmp_path / "full")
    full_sd = full_model["state_dict"]
    assert full_hist[0]["trainable_params"] == total
    # A tiny LR moves nothing visibly: equality to the pretrained backbone proves it was loaded, not re-drawn.
    assert all(torch.allclose(full_sd[k], pre_sd[k], atol=1e-4) for k in backbone)
    assert not torch.allclose(full_sd["fc3.weight"], pre_sd["fc3.weight"], atol=1e-2)


def test_early_stopping_ends_the_run_after_patience_epochs_without_improvement(ray_session, tiny_digits_dir, tmp_path,
                                                                              monkeypatch, capsys,
                                                                              fresh_accelerate_state):
    # min_delta 1.0: no epoch can beat the first by more, so patience 2 ends a 6-epoch run after epoch 3
    cfg = tiny_cfg(tiny_digits_dir, tmp_path, name="es", extra=[
        "train.epochs=6", "train.early_stop_patience=2", "train.early_stop_min_delta=1.0"])
    history, model = fit_in_process(cfg, monkeypatch, tmp_path / "es")
    assert [h["epoch"] for h in history] == [0, 1, 2] and model["metrics"]["epoch"] == 2
    assert "early stop after epoch 3/6: val_acc has not beaten" in capsys.readouterr().out


def test_ema_weights_are_validated_beside_the_raw_ones_and_the_better_is_exported(ray_session, tiny_digits_dir,
                                                                                   tmp_path, monkeypatch,
                                                                                   fresh_accelerate_state):
    cfg = tiny_cfg(tiny_digits_dir, tmp_path, name="ema", extra=["train.epochs=3", "train.ema_decay=0.9"])
    history, model = fit_in_process(cfg, monkeypatch, tmp_path / "ema")
    for h in history:
        ema = bool(h["ema_exported"])
        assert 0 < h["raw_val_acc"] <= 1 and 0 < h["ema_val_acc"] <= 1
        assert h["val_acc"] == (h["ema_val_acc"] if ema else h["raw_val_acc"]) == max(h["raw_val_acc"], h["ema_val_acc"])
        assert h["val_loss"] == (h["ema_val_loss"] if ema else h["raw_val_loss"])
    assert history[0]["ema_val_loss"] != history[0]["raw_val_loss"]  # two different sets of weights
    last = history[-1]
    assert model["metrics"]["ema_weights"] == last["ema_exported"]
    state = torch.load(tmp_path / "ema" / "train_state.pt", weights_only=True)
    ema_sd = state["ema"]
    assert state["ema_updates"] == 3 * -(-n_train(tiny_digits_dir) // 32)  # one per optimizer step
    # The model file holds the weights named in it; the raw ones travel in the resume state when they are not it.
    held = ema_sd if last["ema_exported"] else state["raw_model"] or model["state_dict"]
    assert all(torch.equal(model["state_dict"][k], held[k]) for k in held)
    assert (state["raw_model"] is not None) == bool(last["ema_exported"])


def test_bf16_autocast_trains_on_a_cpu(ray_session, tiny_digits_dir, tmp_path, monkeypatch, fresh_accelerate_state):
    cfg = tiny_cfg(tiny_digits_dir, tmp_path, name="bf16", extra=["train.epochs=3", "train.mixed_precision=bf16"])
    history, model = fit_in_process(cfg, monkeypatch, tmp_path / "bf16")
    assert all(math.isfinite(h["train_loss"]) and h["nonfinite_steps"] == 0 for h in history)
    assert history[-1]["train_loss"] < history[0]["train_loss"] and history[-1]["val_acc"] > 0.3
    # autocast computes in bf16; the weights (and the exported model) stay fp32
    assert all(t.dtype == torch.float32 for t in model["state_dict"].values() if t.is_floating_point())


def test_a_student_learns_what_its_teacher_says(ray_session, tiny_digits_dir, tmp_path, monkeypatch,
                                               fresh_accelerate_state):
    """A teacher (a model file of another input size) that says "3" for every image, alone in the loss
    (alpha 1): the student ends up saying "3" too, where the same run on the labels learns the digits."""
    logits = [0.0] * 10
    logits[3] = 8.0
    teacher = save_model(tmp_path / "teacher.pt", size=24, logits=logits)
    accs = {}
    for name, extra in (("labels", []), ("taught", [f"train.teacher={teacher}", "train.distill_alpha=1.0",
                                                    "train.distill_temperature=2.0", "augment.mixup_alpha=0.2"])):
        cfg = tiny_cfg(tiny_digits_dir, tmp_path, name=name, extra=["train.epochs=3", *extra])
        history, _ = fit_in_process(cfg, monkeypatch, tmp_path / name)
        accs[name] = history[-1]["val_acc"]
    threes = float((read_rows(sorted((tiny_digits_dir / "val").glob("*.parquet"))).labels == 3).mean())
    assert accs["taught"] == pytest.approx(threes, abs=0.02) and accs["labels"] > 2 * threes


def test_a_teacher_of_other_classes_is_refused_before_training(tiny_digits_dir, tmp_path):
    teacher = save_model(tmp_path / "t.pt", classes=["a", "b"])
    cfg = tiny_cfg(tiny_digits_dir, tmp_path, extra=[f"train.teacher={teacher}"])
    with pytest.raises(UserError, match=r"train.teacher: .*t.pt predicts the classes a, b, the dataset has 0, 1"):
        resolve_dataset(cfg)
    cfg = tiny_cfg(tiny_digits_dir, tmp_path, extra=[f"train.teacher={tmp_path / 'missing.pt'}"])
    with pytest.raises(UserError, match="train.teacher: .*missing.pt"):
        resolve_dataset(cfg)


def test_balanced_class_weights_reach_the_training_loss(ray_session, tiny_digits_dir, tmp_path, monkeypatch,
                                                        fresh_accelerate_state):
    losses = {}
    for mode in ("none", "balanced"):  # same seed, same 48 rows (an uneven class mix): only the weights differ
        cfg = tiny_cfg(tiny_digits_dir, tmp_path, name=f"cw_{mode}", extra=[
            "train.epochs=1", "data.max_train_samples=48", f"train.class_weights={mode}"])
        history, _ = fit_in_process(cfg, monkeypatch, tmp_path / mode)
        losses[mode] = history[0]["train_loss"]
        assert math.isfinite(losses[mode]) and history[0]["train_samples"] == 48
    assert losses["balanced"] != pytest.approx(losses["none"], rel=1e-4)


def test_oversampling_trains_every_copy_of_a_rare_class_row_exactly_once(ray_session, tiny_digits_dir, tmp_path,
                                                                         monkeypatch, fresh_accelerate_state):
    import pyarrow.parquet as pq
    from collections import Counter

    files = sorted((tiny_digits_dir / "train").glob("*.parquet"))
    labels = [v for f in files for v in pq.read_table(f, columns=["label"]).column("label").to_pylist()][:48]
    counts = Counter(labels)
    assert len(set(counts.values())) > 1  # an uneven mix, or there is nothing to oversample
    cfg = tiny_cfg(tiny_digits_dir, tmp_path, name="over", extra=[
        "train.epochs=1", "data.max_train_samples=48", "data.balance=oversample"])
    history, _ = fit_in_process(cfg, monkeypatch, tmp_path / "over")
    h = history[0]
    assert math.isfinite(h["train_loss"])
    assert h["train_samples"] == h["unique_samples"] == len(counts) * max(counts.values())


def test_min_steps_trains_a_small_set_for_more_epochs(ray_session, tiny_digits_dir, tmp_path, monkeypatch,
                                                       fresh_accelerate_state):
    steps = -(-n_train(tiny_digits_dir) // 32)  # one worker, batch 32
    cfg = tiny_cfg(tiny_digits_dir, tmp_path, name="ms", extra=["train.epochs=1", f"train.min_steps={2 * steps + 1}"])
    history, _ = fit_in_process(cfg, monkeypatch, tmp_path / "ms")
    assert len(history) == 3 and history[-1]["lr"] < history[0]["lr"]  # the cosine spans the three epochs


def test_adam_accumulation_clipping_smoothing_and_mixing_train(ray_session, tiny_digits_dir, tmp_path, monkeypatch,
                                                               fresh_accelerate_state):
    """The optimizer/step options together, in the loop run in process: Adam, 2-step gradient accumulation,
    clipping, label smoothing, MixUp+CutMix, random erasing, layer-wise LR decay and a frozen-early backbone on
    resnet18. In fp32: under bf16 autocast (what auto trains in on CPUs with native bf16) this combination once
    gave non-finite losses from the first steps in a loaded full-suite run and never alone; until that is
    understood this test checks the options, not bf16 (bf16 training: test_bf16_autocast_trains_on_a_cpu and the
    kill/resume test)."""
    cfg = tiny_cfg(tiny_digits_dir, tmp_path, name="opts", arch="resnet18", extra=[
        "train.mixed_precision='no'", "train.optimizer=adam", "train.lr=0.002", "train.grad_accum_steps=2", "train.grad_clip=1.0",
        "train.label_smoothing=0.1", "augment.mixup_alpha=0.2", "augment.cutmix_alpha=1.0", "augment.mix_prob=0.8", "augment.erasing_p=0.5",
        "model.layer_decay=0.5", "model.transfer=freeze_early", "train.epochs=2"])
    history, _ = fit_in_process(cfg, monkeypatch, tmp_path / "opts")
    from imgcls_dist.models.registry import get_model
    from imgcls_dist.models.transfer import apply_transfer, count_trainable

    m = get_model("resnet18", 10)
    apply_transfer(m, "resnet18", "freeze_early")
    assert len(history) == 2
    for h in history:
        assert math.isfinite(h["train_loss"]) and h["nonfinite_steps"] == 0
        assert h["train_samples"] == n_train(tiny_digits_dir)
        assert h["trainable_params"] == count_trainable(m) < sum(p.numel() for p in m.parameters())
    assert history[-1]["train_loss"] < history[0]["train_loss"]
