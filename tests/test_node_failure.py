"""A whole node dies mid-run: a 2-node Ray cluster on this machine (`ray start --head` + `ray start
--address`, 1 CPU each, so the two Train workers land on different nodes), shards and run storage on the
loopback S3 server. The non-head node (its raylet and every process on it) is killed after the first
checkpoint and a replacement node joins; the run finishes from its checkpoints with every epoch once.
Then a batch-inference job on the same cluster loses its non-head node mid-job: every input row comes out
exactly once, after at most one rerun."""

from __future__ import annotations

import csv
import io
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from imgcls_dist.data.ingest import ingest
from imgcls_dist.errors import JobFailed
from imgcls_dist.ports import free_port
from imgcls_dist.storage import location

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))


def _start(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    """`ray start ... --block` in its own process group: killing the group kills that node's raylet and
    every worker process on it, as losing the machine would."""
    return subprocess.Popen([RAY, "start", "--block", *args], env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _kill_group(proc: subprocess.Popen, sig=signal.SIGKILL) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)


def _wait(pred, timeout: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    deadline = time.time() + timeout
    while not pred():
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"{what}: the process exited ({proc.returncode}): " + (log.read_text()[-3000:] if log else ""))
        if time.time() > deadline:
            pytest.fail(f"never saw: {what}" + (": " + log.read_text()[-3000:] if log else ""))
        time.sleep(0.5)


def _started(log: Path) -> bool:
    # `ray start` prints this once the node's raylet has registered with the GCS. Read from its log rather
    # than asked of the cluster: a `ray.init` probe costs a Python start-up (~2 s of a loaded 2-CPU box) per poll.
    return "Ray runtime started" in log.read_text(errors="replace")


def _node_args(address: str, temp_dir: str) -> list[str]:
    return [f"--address={address}", "--num-cpus=1", "--node-ip-address=127.0.0.1", f"--temp-dir={temp_dir}"]


def _big_input(bucket: str, tmp_path: Path, copies: int = 2) -> tuple[str, set[str]]:
    """The ingested test split `copies` times under new ids, as shards on S3: long enough a job (~8 parts)
    for a node to die in the middle of it."""
    from test_infer_helpers import write_input

    from imgcls_dist.data.schema import ID, IMAGE, LABEL

    test = location(f"{bucket}/digits/test")
    t = pa.concat_tables(pq.read_table(f.path, filesystem=f.fs) for f in test.files(".parquet"))
    base = list(zip(t.column(ID).to_pylist(), t.column(IMAGE).to_pylist(), t.column(LABEL).to_pylist()))
    rows = [(f"{k}-{i}", img, lbl) for k in range(copies) for i, img, lbl in base]
    write_input(tmp_path / "big", rows, rows_per_shard=500)
    location(f"{bucket}/big").upload(tmp_path / "big")
    return f"{bucket}/big", {r[0] for r in rows}


def _infer_survives_losing_a_node(bucket, model, nodes, address, env, temp_dir, tmp_path) -> None:
    """Kill the non-head node (it holds the predictor actor or decode/write tasks: one CPU per node) once the
    job has written parts; the job completes (Ray retries) or fails with one line, and then at most one rerun
    publishes every input row exactly once."""
    from imgcls_dist.infer.publish import prediction_files, read_manifest, staging_dirs
    from imgcls_dist.infer.parts import staged_parts

    inp, ids = _big_input(bucket, tmp_path)
    out = location(f"{bucket}/preds")
    cmd = [sys.executable, "-m", "imgcls_dist.cli", "infer", "--models", model.uri, "--input", inp,
           "--output", out.uri, "--batch-size", "32", "--tta", "identity,shift_left,shift_right,zoom_in"]
    denv = {**env, "RAY_ADDRESS": address}
    log = tmp_path / "infer.log"
    job = subprocess.Popen(cmd, env=denv, stdout=open(log, "w"), stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        _wait(lambda: sum(len(staged_parts(d)) for d in staging_dirs(out)) >= 2, 240, "two staged parts", job, log)
        assert job.poll() is None and not (out / "_manifest.json").exists(), "the job ended before the node loss"
        _kill_group(nodes[-1])
        nodes.append(_start(_node_args(address, temp_dir), env, tmp_path / "node3.log"))
        rc = job.wait(300)
    finally:
        if job.poll() is None:
            job.kill()
            job.wait(30)
    text = log.read_text()
    if rc != 0:  # failed clearly: one error line, then one rerun resumes what was written
        errors = [ln for ln in text.splitlines() if ln.startswith("imgcls-dist infer: error: ")]
        assert rc == JobFailed.exit_code and len(errors) == 1, text[-3000:]
        rerun = subprocess.run(cmd, env=denv, capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert rerun.returncode == 0, (rerun.stdout + rerun.stderr)[-3000:]
        assert read_manifest(out)["resumed_from"], "the rerun predicted everything again"
    m = read_manifest(out)
    got = pa.concat_tables(pq.read_table(f.path, filesystem=f.fs, columns=["id"]) for f in prediction_files(out))
    assert m["rows_in"] == m["rows_out"] == got.num_rows == len(ids) == len(set(got.column("id").to_pylist()))
    assert set(got.column("id").to_pylist()) == ids
    print(f"infer after the node loss: exit {rc}; {m['rows_predicted']} rows predicted by the publishing run, "
          f"{m['rows_adopted']} adopted")


def test_losing_a_whole_node_resumes_on_a_replacement(s3, tmp_path):
    bucket = s3.bucket("node")
    ingest("builtin:digits", f"{bucket}/digits", image_size=16, fractions=(0.3, 0.1, 0.6), rows_per_shard=200,
           verbose=False)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] = "1"  # a real multi-node run keeps Train's default
    env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"  # stopping a node at the end needs no drain
    # The GCS declares a node dead after failure_threshold missed health checks, period_ms apart (defaults
    # 5 x 3 s); a killed raylet fails each check at once, so 3 x 0.5 s detects the same loss 13 s sooner.
    env["RAY_health_check_period_ms"] = "500"
    # The nodes listen on the machine's address, not only loopback: token auth, with one token for every node
    # and the driver. Explicit, because with RAY_AUTH_MODE unset a head enables token auth on its own when
    # ~/.ray/auth_token exists, and nodes started without the mode then cannot join it.
    env["RAY_AUTH_MODE"], env["RAY_AUTH_TOKEN"] = "token", secrets.token_hex(32)
    env["RAY_health_check_failure_threshold"] = "3"
    # Its own short temp dir (Unix socket paths are capped at 107 bytes): `ray start` records "the current
    # cluster" there, not in /tmp/ray where a later plain ray.init on this machine would find it.
    temp_dir = tempfile.mkdtemp(prefix="rnf", dir="/tmp")
    port = free_port()
    address = f"127.0.0.1:{port}"
    nodes: list[subprocess.Popen] = []
    driver = None
    try:
        nodes.append(_start(["--head", f"--port={port}", "--num-cpus=1", "--node-ip-address=127.0.0.1",
                             "--include-dashboard=false", f"--temp-dir={temp_dir}"], env, tmp_path / "head.log"))
        _wait(lambda: _started(tmp_path / "head.log"), 90, "the head node", nodes[0], tmp_path / "head.log")
        nodes.append(_start(_node_args(address, temp_dir), env, tmp_path / "node1.log"))
        _wait(lambda: _started(tmp_path / "node1.log"), 90, "the second node", nodes[1], tmp_path / "node1.log")

        run = location(f"{bucket}/runs/nodes")
        cmd = [sys.executable, "-m", "imgcls_dist.cli", "train", "--config", str(ROOT / "configs/lenet5_digits.yaml")]
        for s in [f"data.path={bucket}/digits", "data.image_size=16", "data.loader_workers=0", "train.epochs=3",
                  "train.warmup_epochs=0", "train.checkpoint_every_steps=2", "scaling.num_workers=2",
                  "run.max_failures=3", f"run.storage_path={bucket}/runs", "run.name=nodes", "run.tensorboard=false"]:
            cmd += ["--set", s]
        log = tmp_path / "driver.log"
        driver = subprocess.Popen(cmd, env={**env, "RAY_ADDRESS": address}, stdout=open(log, "w"),
                                  stderr=subprocess.STDOUT, cwd=tmp_path)
        _wait(lambda: any(f.name == "train_state.pt" for f in run.files()), 240, "a first checkpoint", driver, log)

        _kill_group(nodes[1])  # the non-head node: its raylet and its Train worker
        nodes.append(_start(_node_args(address, temp_dir), env, tmp_path / "node2.log"))
        try:
            rc = driver.wait(300)
        except subprocess.TimeoutExpired:
            pytest.fail("the run did not finish after the node loss: " + log.read_text()[-3000:])
        assert rc == 0, log.read_text()[-3000:]
        epochs = [int(r["epoch"]) for r in csv.DictReader(io.StringIO((run / "metrics.csv").read_text()))]
        assert epochs == [0, 1, 2], log.read_text()[-3000:]  # every epoch once, none lost, none repeated
        rows = list(csv.DictReader(io.StringIO((run / "metrics.csv").read_text())))
        assert all(r["train_samples"] == r["unique_samples"] for r in rows)  # exactly once across the loss
        assert (run / "model.pt").is_file()

        # The batch job on the same cluster (head + the replacement): the non-head node dies mid-job.
        _infer_survives_losing_a_node(bucket, run / "model.pt", nodes, address, env, temp_dir, tmp_path)
    finally:
        if driver is not None and driver.poll() is None:
            driver.kill()
            driver.wait(30)
        for proc in reversed(nodes):
            if proc.poll() is None:
                _kill_group(proc, signal.SIGTERM)
        shutil.rmtree(temp_dir, ignore_errors=True)
