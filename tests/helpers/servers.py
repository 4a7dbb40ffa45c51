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
