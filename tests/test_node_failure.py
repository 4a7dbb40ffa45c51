"""A whole node dies mid-run: a 2-node Ray cluster on this machine (`ray start --head` + `ray start
--address`, 1 CPU each, so the two Train workers land on different nodes), shards and run storage on the
loopback S3 server. The non-head node (its raylet and every process on it) is killed after the first
checkpoint and a replacement node joins; the run finishes from its checkpoints with every epoch once."""

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

import pytest

from imgcls_dist.data.ingest import ingest
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
        nodes.append(_start([f"--address={address}", "--num-cpus=1", "--node-ip-address=127.0.0.1", f"--temp-dir={temp_dir}"], env,
                            tmp_path / "node1.log"))
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
        nodes.append(_start([f"--address={address}", "--num-cpus=1", "--node-ip-address=127.0.0.1", f"--temp-dir={temp_dir}"], env,
                            tmp_path / "node2.log"))
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
    finally:
        if driver is not None and driver.poll() is None:
            driver.kill()
            driver.wait(30)
        for proc in reversed(nodes):
            if proc.poll() is None:
                _kill_group(proc, signal.SIGTERM)
        shutil.rmtree(temp_dir, ignore_errors=True)
