"""Test helper (no tests here): servers the tests start on loopback, and stopping what they started."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from imgcls_dist.ports import free_port, wait_listening


def start_moto(env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    """moto_server on a free loopback port; returns (process, endpoint URL) once it answers."""
    port = free_port()
    exe = Path(sys.executable).with_name("moto_server")
    proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, **(env or {})})
    wait_listening(port, proc, "moto_server")
    return proc, f"http://127.0.0.1:{port}"


def stop(proc: subprocess.Popen) -> None:
    """Stop a process this test session started, by its own pid."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def start_mlflow(root: Path, port: int | None = None) -> tuple[subprocess.Popen, str]:
    """`mlflow server` on a free loopback port (or `port`: a stopped server back where it was) with a SQLite backend
    and a local artifact root under `root`; returns (process, tracking URI) once it answers."""
    port = port or free_port()
    exe = Path(sys.executable).with_name("mlflow")
    root.mkdir(parents=True, exist_ok=True)
    log = (root / "server.log").open("a")
    # Without the job runner: MLflow 3's server otherwise starts a job runner and several huey consumer processes
    # (none of which the tests use) beside uvicorn. Its own session, so that stop_group ends uvicorn with it.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen([str(exe), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                             "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
                             "--artifacts-destination", str(root / "artifacts")],
                            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    wait_listening(port, proc, "mlflow server", timeout=120)
    return proc, f"http://127.0.0.1:{port}"


def stop_group(proc: subprocess.Popen, timeout_s: float = 10) -> None:
    """Stop a server this test session started in a session of its own, with the processes it started (the
    process group of its own pid)."""
    import signal
    import time

    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.time() + timeout_s
    while _group_alive(proc.pid) and time.time() < deadline:
        time.sleep(0.1)
    if _group_alive(proc.pid):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout_s)


def _group_alive(pgid: int) -> bool:
    import psutil

    for p in psutil.process_iter():
        try:
            if os.getpgid(p.pid) == pgid and p.status() != psutil.STATUS_ZOMBIE:
                return True
        except (ProcessLookupError, psutil.Error):
            continue
    return False
