"""Test helper (no tests here): a Ray head started as a user starts one (`ray start --head --block` from this
venv, its own ports, token auth and a short --temp-dir, so it never meets the suite's `ray_session`
instance), and jobs submitted to it with `ray job submit --working-dir <repo>`.

The head is stopped by signalling its own `ray start --block` process (which takes down the processes it
started), then anything left in its process group or naming its temp dir: never `ray stop`, which kills every
Ray process on the machine, including the suite's shared instance and other users' clusters.
"""

from __future__ import annotations

import atexit
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import yaml

from imgcls_dist.ports import free_ports

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
RAY = BIN / "ray"


def job_server_missing() -> str | None:
    """Why `ray job submit` cannot work with this install, or None."""
    try:
        import ray.dashboard.optional_deps  # noqa: F401 - the dashboard serves its HTTP/job API only with these
        import requests  # noqa: F401 - the job client
    except ImportError as e:
        return (f"`ray job submit` needs the dashboard's job server from ray[default]; this venv lacks "
                f"{e.name!r} (pip install 'ray[default]')")
    return None


def ray_client_installed() -> bool:
    from ray._private.utils import get_ray_client_dependency_error  # what `ray start` itself checks

    return get_ray_client_dependency_error() is None


def ray_processes_of(pgid: int, temp_dir: Path) -> list[int]:
    """Processes this test started: in the head's own process group, or naming its private temp dir."""
    import psutil

    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if p.pid == os.getpid():
                continue
            if os.getpgid(p.pid) == pgid or str(temp_dir) in " ".join(p.info["cmdline"] or []):
                found.append(p.pid)
        except (ProcessLookupError, psutil.Error, OSError):
            continue
    return found


class RayHead:
    """A single-node Ray cluster started as a user would: `ray start --head --block` from this venv."""

    def __init__(self, num_cpus: int = 2, *, extra_env: dict[str, str] | None = None, args: tuple[str, ...] = ()):
        # Short: Ray puts Unix sockets under it and AF_UNIX paths are capped at 107 bytes.
        self.temp_dir = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))
        (self.gcs_port, self.dashboard_port, self.client_port, self.agent_http_port, self.agent_grpc_port,
         self.runtime_env_agent_port, self.metrics_port) = free_ports(7)
        self.gcs_address = f"127.0.0.1:{self.gcs_port}"
        self.dashboard_url = f"http://127.0.0.1:{self.dashboard_port}"
        self.num_cpus = num_cpus
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"))}
        env.update({
            # `python` in a job's entrypoint is resolved on PATH by the job supervisor: this venv's.
            "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
            # Token auth as a shared cluster should run it (Ray 2.60 turns it on for local clusters by
            # default); every process of this test - head, drivers, CLI calls - carries the token.
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": secrets.token_hex(32),
            "RAY_USAGE_STATS_ENABLED": "0",
            "OMP_NUM_THREADS": "1",
            # On SIGTERM, `ray start --block` first drains the node for up to 30 s (for Serve replicas);
            # nothing here needs that.
            "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
            **(extra_env or {}),
        })
        self.args = list(args)
        self.env = env
        self.log = self.temp_dir / "head.log"
        self.proc: subprocess.Popen | None = None

    @property
    def logs_dir(self) -> Path:
        return self.temp_dir / "session_latest" / "logs"

    def start(self, timeout: float = 90.0, need_dashboard: bool = False) -> None:
        cmd = [str(RAY), "start", "--head", "--block",
               f"--port={self.gcs_port}", f"--dashboard-port={self.dashboard_port}", "--dashboard-host=127.0.0.1",
               f"--dashboard-agent-listen-port={self.agent_http_port}",
               f"--dashboard-agent-grpc-port={self.agent_grpc_port}",
               f"--runtime-env-agent-port={self.runtime_env_agent_port}", f"--metrics-export-port={self.metrics_port}",
               f"--num-cpus={self.num_cpus}", "--num-gpus=0", f"--temp-dir={self.temp_dir}", "--disable-usage-stats",
               *self.args]
        if ray_client_installed():  # its server would otherwise take the fixed port 10001
            cmd.append(f"--ray-client-server-port={self.client_port}")
        with open(self.log, "w") as f:
            # Own session/process group: the backstop in stop() can find exactly what this started.
            self.proc = subprocess.Popen(cmd, env=self.env, stdout=f, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        atexit.register(self.stop)
        deadline = time.monotonic() + timeout
        while "Ray runtime started" not in self.log.read_text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"ray start --head failed:\n{self.tail()}")
            time.sleep(0.3)
        if need_dashboard:
            while not self._dashboard_up():
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"the dashboard (job server) did not come up:\n{self.tail()}")
                time.sleep(0.5)

    def _dashboard_up(self) -> bool:
        req = urllib.request.Request(f"{self.dashboard_url}/api/version",
                                     headers={"Authorization": f"Bearer {self.env['RAY_AUTH_TOKEN']}"})
        try:
            with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(req, timeout=2) as r:
                return r.status == 200
        except urllib.error.HTTPError:
            return True  # it answers; `ray job submit` reports anything wrong with the request itself
        except OSError:
            return False

    def tail(self, n: int = 40) -> str:
        parts = [self.log.read_text()] if self.log.exists() else []
        for name in ("raylet.err", "gcs_server.err", "dashboard.err", "dashboard.log"):
            f = self.logs_dir / name
            if f.exists():
                parts.append(f"--- {name}\n" + "\n".join(f.read_text(errors="replace").splitlines()[-n:]))
        return "\n".join(parts)[-8000:]

    def stop(self) -> None:
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # `ray start --block` then stops the processes it started
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        deadline = time.monotonic() + 10
        while (left := ray_processes_of(proc.pid, self.temp_dir)) and time.monotonic() < deadline:
            time.sleep(0.5)
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


class Done(subprocess.CompletedProcess):
    """A finished command: exit code, combined output and the pid it ran as."""

    def __init__(self, args, returncode, stdout, pid):
        super().__init__(args, returncode, stdout, None)
        self.pid = pid


def kill_group(proc: subprocess.Popen, sig=signal.SIGKILL) -> None:
    """Signal the process group a test started with start_new_session=True (its leader may have exited
    already; what it started, e.g. a local Ray, is still in the group), then reap the leader."""
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)


def run_cmd(cmd: list[str], *, cwd: Path, env: dict, timeout: float) -> Done:
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # its own group: the client/driver and nothing else
        out, _ = proc.communicate()
        raise AssertionError(f"timed out after {timeout:.0f}s: {shlex.join(cmd)}\n{out[-6000:]}") from None
    return Done(cmd, proc.returncode, out, proc.pid)


class Job:
    """`ray job submit --working-dir <repo> --runtime-env <cluster/runtime_env.yaml + RAY_ADDRESS> -- python
    <script_args>`, run from another directory (only the uploaded working dir may provide jobs/ and configs/)
    and in the background: `wait()` returns its output once `ray job status` says how it ended."""

    def __init__(self, head: RayHead, script_args: list[str], name: str, tmp: Path):
        self.head, self.tmp = head, tmp
        env_file = tmp / "runtime_env.yaml"
        if not env_file.exists():
            runtime_env = yaml.safe_load((ROOT / "cluster" / "runtime_env.yaml").read_text())
            # Every process of the job (driver, Train controller, workers) resolves this head even with
            # other Ray instances on the machine (the suite's own, other users').
            runtime_env.setdefault("env_vars", {})["RAY_ADDRESS"] = head.gcs_address
            env_file.write_text(yaml.safe_dump(runtime_env))
        self.sid = f"{name}-{secrets.token_hex(4)}"
        self.cmd = [str(RAY), "job", "submit", "--address", head.dashboard_url, "--submission-id", self.sid,
                    "--working-dir", str(ROOT), "--runtime-env", str(env_file), "--", "python", *script_args]
        self.log = tmp / f"{self.sid}.out"
        with open(self.log, "w") as f:
            self.proc = subprocess.Popen(self.cmd, cwd=tmp, env=head.env, stdout=f, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)

    @property
    def driver_log(self) -> Path:
        return self.head.logs_dir / f"job-driver-{self.sid}.log"

    def running(self) -> bool:
        return self.proc.poll() is None

    def wait(self, timeout: float) -> tuple[bool, str, str]:
        """(succeeded, the submit command's output, `ray job status` output)."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)  # its own group: the client and nothing else
            self.proc.wait()
            raise AssertionError(f"timed out after {timeout:.0f}s: {shlex.join(self.cmd)}\n"
                                 f"{self.log.read_text()[-6000:]}") from None
        status = run_cmd([str(RAY), "job", "status", "--address", self.head.dashboard_url, self.sid], cwd=self.tmp,
                         env=self.head.env, timeout=60)
        # `ray job status` prints "Job '<id>' succeeded" (2.60); older releases printed SUCCEEDED.
        ok = self.proc.returncode == 0 and bool(re.search(rf"{self.sid}' succeeded|SUCCEEDED", status.stdout))
        return ok, self.log.read_text(), status.stdout

    def succeeded(self, timeout: float) -> str:
        ok, out, status = self.wait(timeout)
        assert ok, f"{shlex.join(self.cmd)} -> exit {self.proc.returncode}\n{out[-6000:]}\n--- ray job status\n{status}"
        assert self.driver_log.is_file()
        return out
