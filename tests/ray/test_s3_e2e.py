"""The whole workflow on s3:// only (a real S3-protocol server on loopback): no local path in any job's
arguments, every artifact in the bucket where docs/cluster.md says, nothing in the working directory.
Then the object-store publish protocol of batch inference: killed runs, reruns, concurrent runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from helpers.model_files import save_model, save_nan_model
from helpers.digit_trees import image_tree

from imgcls_dist.cli import main
from imgcls_dist.data.synthetic import write_synthetic_shards
from imgcls_dist.errors import UserError
from imgcls_dist.batch.pipeline import run_batch_inference
from imgcls_dist.batch.publish import LEASES, MANIFEST, STAGING_PREFIX, prediction_files, read_manifest
from imgcls_dist.storage import location

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]

TINY = {
    "data": {"image_size": 16, "batch_size": 32, "loader_workers": 0},
    "model": {"arch": "lenet5"},
    "train": {"epochs": 1, "optimizer": "adamw", "lr": 0.003, "scheduler": "cosine"},
    "augment": {"preset": "light"},
    "scaling": {"num_workers": 1},
}


def names(loc) -> set[str]:
    return {f.relative_to(loc) for f in loc.files()}


@pytest.fixture(scope="module")
def workflow(ray_session, s3, tmp_path_factory):
    """ingest -> train -> tune -> infer -> evaluate -> predict, every path an s3:// URI."""
    cwd = tmp_path_factory.mktemp("cwd")
    old = os.getcwd()
    os.chdir(cwd)
    try:
        bucket = s3.bucket("e2e")
        photos = tmp_path_factory.mktemp("photos")
        image_tree(photos, per_class=24, size=16, classes=tuple(str(i) for i in range(10)),
                   splits={"train": 0.6, "val": 0.2, "test": 0.2})
        location(f"{bucket}/photos").upload(photos)
        cfg = {**TINY, "data": {**TINY["data"], "path": f"{bucket}/data"},
               "run": {"name": "lenet", "storage_path": f"{bucket}/runs"}}
        location(f"{bucket}/configs/lenet.yaml").write_text(yaml.safe_dump(cfg))
        # Two trials; one starts from NaN weights (a corrupt checkpoint) and fails: the campaign goes on.
        nan_model = save_nan_model(location(f"{bucket}/nan"))
        tune_cfg = {**cfg, "train": {**cfg["train"], "epochs": 1, "max_nonfinite_steps": 3},
                    "run": {"name": "search", "storage_path": f"{bucket}/tune"},
                    "tune": {"search": "grid", "space": {"model.weights": {"type": "choice",
                                                                           "values": [None, nan_model.uri]}},
                             "top_k": 2}}
        location(f"{bucket}/configs/tune.yaml").write_text(yaml.safe_dump(tune_cfg))
        # An ensemble manifest that names its members by URI (the trained run and the campaign's member).
        location(f"{bucket}/by_uri/ensemble.json").write_text(json.dumps({"models": [
            {"path": f"{bucket}/runs/lenet/model.pt"}, {"path": f"{bucket}/tune/search/models/trial_00000/model.pt"}]}))
        codes = {
            "ingest": main(["ingest", f"{bucket}/photos", f"{bucket}/data", "--rows-per-shard", "40"]),
            "train": main(["train", "--config", f"{bucket}/configs/lenet.yaml"]),
            "tune": main(["tune", "--config", f"{bucket}/configs/tune.yaml"]),
            "infer": main(["infer", "--models", f"{bucket}/tune/search/ensemble.json", "--input", f"{bucket}/data/test",
                           "--output", f"{bucket}/preds"]),
            "evaluate": main(["evaluate", f"{bucket}/preds", "--classes", f"{bucket}/data/dataset.json"]),
            "predict": main(["predict", f"{bucket}/photos/test/3/3_0020.png", "--models",
                             f"{bucket}/runs/lenet/model.pt", "--topk", "2"]),
            "predict_by_uri": main(["predict", f"{bucket}/photos/test/3/3_0020.png", "--models",
                                    f"{bucket}/by_uri/ensemble.json"]),
        }
        return bucket, codes, cwd
    finally:
        os.chdir(old)


def test_every_job_ran_on_s3_only_and_left_nothing_locally(workflow):
    _, codes, cwd = workflow
    assert codes == {k: 0 for k in codes}
    assert list(cwd.iterdir()) == []


def test_train_artifacts_are_in_the_run_directory(workflow):
    bucket, _, _ = workflow
    run = location(f"{bucket}/runs/lenet")
    got = names(run)
    for f in ("config.yaml", "metrics.csv", "training_history.png", "model.pt", "summary.json",
              "classification_report.txt", "confusion_matrix.png", "metrics.json"):
        assert f in got, f
    assert any(n.startswith("tensorboard/events.out.tfevents") for n in got)
    assert any(n.startswith("checkpoint_") and n.endswith("/model.pt") for n in got)  # Ray Train's, same bucket
    assert len((run / "metrics.csv").read_text().strip().splitlines()) == 1 + 1
    summary = json.loads((run / "summary.json").read_text())
    assert summary["run_dir"] == run.uri and 0 <= summary["test_acc"] <= 1


def test_tune_results_and_ensemble_are_in_the_campaign_directory(workflow):
    bucket, _, _ = workflow
    campaign = location(f"{bucket}/tune/search")
    got = names(campaign)
    for f in ("config.yaml", "campaign.json", "results.csv", "best.yaml", "ensemble.json", "val_acc_vs_lr.png",
              "trial_curves.png"):
        assert f in got, f
    ens = json.loads((campaign / "ensemble.json").read_text())
    assert [m["name"] for m in ens["models"]] == ["trial_00000"]  # the failed trial is no member
    for m in ens["models"]:  # members relative to the campaign, exported beside it
        assert (campaign / m["path"]).is_file()
    assert any(n.startswith("trials/trial_00000/checkpoint_") for n in got)


def test_a_failing_trial_is_marked_and_the_campaign_goes_on(workflow, ray_session):
    from imgcls_dist.tune.results import read_results_csv
    from helpers.ray_procs import wait_all_cpus_free

    bucket, _, _ = workflow
    rows = read_results_csv(f"{bucket}/tune/search/results.csv")
    bad = next(r for r in rows if r["model.weights"])
    assert bad["status"] == "ERROR" and "non-finite for 3 consecutive steps" in bad["error"]
    assert bad["best_val_acc"] == "" and bad["epochs_run"] == "0" and bad["stopped_early"] == "False"
    assert [r["status"] for r in rows] == ["TERMINATED", "ERROR"] and rows[-1]["trial"] == bad["trial"]
    assert wait_all_cpus_free(ray_session) == 2  # both trials' Train runs gave their CPUs back


def test_predictions_evaluation_and_predict(workflow, capsys):
    bucket, _, _ = workflow
    preds = location(f"{bucket}/preds")
    manifest = read_manifest(preds)
    test_rows = json.loads(location(f"{bucket}/data/dataset.json").read_text())["counts"]["test"]
    assert manifest["rows_in"] == manifest["rows_out"] == test_rows and len(manifest["models"]) == 1
    files = prediction_files(preds)
    assert sum(pq.ParquetFile(f.path, filesystem=f.fs).metadata.num_rows for f in files) == test_rows
    assert {"eval/classification_report.txt", "eval/confusion_matrix.png", "eval/metrics.json"} <= names(preds)
    assert not [n for n in names(preds) if n.startswith((STAGING_PREFIX, LEASES))]
    capsys.readouterr()
    assert main(["predict", f"{bucket}/photos/test/3/3_0020.png", "--models", f"{bucket}/by_uri/ensemble.json"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"{bucket}/photos/test/3/3_0020.png: ") and len(line.split(", ")) == 5


def _start_infer(model, inputs: str, out: str, batch_size: int = 16) -> subprocess.Popen:
    import ray

    code = ("import sys; from imgcls_dist.batch.pipeline import run_batch_inference as r; "
            "r(sys.argv[1], sys.argv[2], sys.argv[3], batch_size=int(sys.argv[4]))")
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    return subprocess.Popen([sys.executable, "-c", code, str(model), inputs, out, str(batch_size)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _wait_for(pred, proc: subprocess.Popen, what: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not pred():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < deadline, f"never saw: {what}"
        time.sleep(0.2)


def test_object_store_publish_survives_kills_reruns_and_concurrent_runs(ray_session, s3, tmp_path):
    bucket = s3.bucket("pub")
    write_synthetic_shards(tmp_path / "rows", 1200, size=32, rows_per_shard=200)
    location(f"{bucket}/rows").upload(tmp_path / "rows")
    slow_model = save_model(tmp_path / "r18", "resnet18", 32, seed=4)  # slow enough to be caught mid-run
    out = location(f"{bucket}/out")

    # 1. a run killed mid-way leaves no manifest (nothing claims completeness); its lease and staging remain
    proc = _start_infer(slow_model, f"{bucket}/rows", out.uri)
    try:
        _wait_for(lambda: any(d.name.startswith(STAGING_PREFIX) for d in out.iterdir()), proc, "staging output")
        # 2. meanwhile a second run into the same OUT is refused, clearly, before it writes anything
        with pytest.raises(UserError, match="another infer run .* is writing here"):
            run_batch_inference(slow_model, f"{bucket}/rows", out, verbose=False)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / MANIFEST).exists()
    with pytest.raises(UserError, match="did not finish"):
        read_manifest(out)

    # 3. the rerun (same host, the killed run's process is gone: its lease is stale at once) publishes all rows;
    #    it uses another model, so the killed run's parts are discarded (fresh), not resumed
    fast = save_model(tmp_path / "l5", "lenet5", 32, seed=1)
    first = run_batch_inference(fast, f"{bucket}/rows", out, fresh=True, verbose=False)
    assert first["rows_out"] == 1200
    # 4. a rerun replaces, never duplicates
    second = run_batch_inference(fast, f"{bucket}/rows", out, verbose=False)
    files = prediction_files(out)
    ids = [i for f in files for i in pq.read_table(f.path, filesystem=f.fs, columns=["id"]).column("id").to_pylist()]
    assert len(ids) == len(set(ids)) == 1200 and all(second["run_id"] in f.name for f in files)
    assert [f.name for f in out.files(".parquet", recursive=False)] == [f.name for f in files]
    assert not [d for d in out.iterdir() if d.name.startswith(STAGING_PREFIX)]
    assert not (out / LEASES).files()
