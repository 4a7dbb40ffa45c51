"""What a user does to run the jobs on a cluster, on a real Ray head started with the `ray` CLI.

* Fast checks of cluster/: every YAML parses; the launcher config validates against Ray's own schema;
  the KubeRay RayJobs name real entrypoints whose arguments the CLI and the config model accept; the
  working_dir that `ray job submit` would upload (Ray's own packaging code, .gitignore honoured as
  Ray does by default) holds the whole package and none of .venv/runs/data.
* e2e: `ray start --head --block` (this venv's `ray`, its own ports and a short --temp-dir, so it never
  meets the suite's `ray_session` instance), then `ray job submit --working-dir <repo> --runtime-env
  <cluster/runtime_env.yaml + RAY_ADDRESS> -- python jobs/train.py ...`, then the same for
  jobs/batch_infer.py on the run's model.pt; `ray job status` must say SUCCEEDED and the artifacts must
  be where docs/cluster.md says. The job server is part of ray[default]; where this venv lacks it the
  same entrypoints run as drivers on the head node (RAY_ADDRESS=<head>), which is the job driver's own
  code path. Exactly one of the two variants runs; the other is skipped with the reason.

The head is stopped by signalling its own `ray start --block` process (which takes down the processes it
started), then anything left in its process group: never `ray stop`, which kills every Ray process on
the machine, including the suite's shared instance and other users' clusters.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
BIN = Path(sys.executable).parent
RAY = BIN / "ray"
JOB_SCRIPTS = {"train": "jobs/train.py", "tune": "jobs/tune.py", "infer": "jobs/batch_infer.py"}


def _ray_version() -> str:
    import ray

    return ray.__version__


def _yaml_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _rayjobs() -> dict[str, dict]:
    return {p.name: d for p in sorted((CLUSTER / "kuberay").glob("rayjob-*.yaml")) for d in _yaml_docs(p)
            if d.get("kind") == "RayJob"}


# ------------------------------------------------------------------------------------------ fast checks


def test_every_cluster_yaml_parses():
    files = sorted(CLUSTER.rglob("*.yaml"))
    names = {str(f.relative_to(CLUSTER)) for f in files}
    assert {"runtime_env.yaml", "cluster.yaml", "kuberay/raycluster.yaml", "kuberay/shared-storage.yaml",
            "kuberay/rayjob-train.yaml", "kuberay/rayjob-tune.yaml", "kuberay/rayjob-batch-infer.yaml"} <= names
    for f in files:
        docs = _yaml_docs(f)
        assert docs and all(isinstance(d, dict) for d in docs), f


def test_runtime_env_excludes_what_must_not_be_uploaded():
    env = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    assert env["working_dir"] == "."
    excludes = env["excludes"]
    for must in ("/.venv", "/.git", "/runs", "/data", "**/__pycache__", "*.egg-info"):
        assert must in excludes, must
    # Unanchored `data`/`runs` would also drop the imgcls_dist/data package.
    assert not {"data", "data/", "runs", "runs/"} & set(excludes)
    assert set(env) <= {"working_dir", "excludes", "env_vars", "pip", "py_modules", "uv", "conda", "config"}


def test_launcher_config_is_valid_for_this_ray():
    import jsonschema
    import ray.autoscaler

    cfg = yaml.safe_load((CLUSTER / "cluster.yaml").read_text())
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(cfg, schema)  # what `ray up` checks first
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types and cfg["provider"]["type"] == "aws"
    gpu_types = [t for t in types.values() if re.match(r"(g4dn|g5|g6|p3|p4d|p5)\.", t["node_config"]["InstanceType"])]
    assert gpu_types and any(t.get("min_workers", 0) >= 1 for t in gpu_types)
    assert sum(t.get("min_workers", 0) for t in types.values()) <= cfg["max_workers"]
    assert f"rayproject/ray:{_ray_version()}-py3{sys.version_info.minor}" in cfg["docker"]["image"]
    assert any("pip install" in c and "-e" in c for c in cfg["setup_commands"])
    assert "." in cfg["file_mounts"].values()
    assert not {"data", "runs"} & set(cfg["rsync_exclude"])  # unanchored would drop imgcls_dist/data


def test_kuberay_manifests_fit_this_project():
    docs = {p.name: _yaml_docs(p) for p in sorted((CLUSTER / "kuberay").glob("*.yaml"))}
    (pvc,) = docs["shared-storage.yaml"]
    assert pvc["kind"] == "PersistentVolumeClaim" and "ReadWriteMany" in pvc["spec"]["accessModes"]
    (rc,) = docs["raycluster.yaml"]
    assert (rc["apiVersion"], rc["kind"]) == ("ray.io/v1", "RayCluster")
    clusters = [rc["spec"]] + [j["spec"]["rayClusterSpec"] for j in _rayjobs().values()]
    for spec in clusters:
        assert spec["rayVersion"] == _ray_version()
        groups = spec["workerGroupSpecs"]
        assert any(c["resources"]["limits"].get("nvidia.com/gpu") for g in groups
                   for c in g["template"]["spec"]["containers"])
        for tmpl in [spec["headGroupSpec"]["template"]] + [g["template"] for g in groups]:
            pod = tmpl["spec"]
            claims = {v["persistentVolumeClaim"]["claimName"] for v in pod.get("volumes", []) if "persistentVolumeClaim" in v}
            assert claims == {pvc["metadata"]["name"]}
            for c in pod["containers"]:
                assert {"mountPath": "/mnt/shared", "name": "shared"} in c["volumeMounts"]
                assert c["resources"]["limits"]["cpu"] and c["resources"]["limits"]["memory"]


@pytest.mark.parametrize("manifest,command", [("rayjob-train.yaml", "train"), ("rayjob-tune.yaml", "tune"),
                                              ("rayjob-batch-infer.yaml", "infer")])
def test_rayjob_entrypoint_is_a_real_job_with_valid_arguments(manifest, command):
    from imgcls_dist.cli import build_parser
    from imgcls_dist.config import load_config

    job = _rayjobs()[manifest]
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] >= 0
    env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert env["working_dir"] and "/.venv" in env["excludes"] and "/data" in env["excludes"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["python", JOB_SCRIPTS[command]] and (ROOT / argv[1]).is_file()
    args = build_parser().parse_args([command, *argv[2:]])  # argparse exits (fails the test) on a bad flag
    if command in ("train", "tune"):
        assert (ROOT / args.config).is_file()
        cfg = load_config(ROOT / args.config, args.overrides)  # unknown keys / bad values raise
        assert cfg.data.path.startswith("/mnt/shared/") and cfg.run.storage_path.startswith("/mnt/shared/")
        assert cfg.scaling.use_gpu is True
    else:
        assert all(p.startswith("/mnt/shared/") for p in [*args.models, args.input, args.output])


def _package(tmp_path: Path, excludes: list[str], include_gitignore: bool) -> list[str]:
    from ray._private.runtime_env.packaging import create_package  # what `ray job submit` zips

    out = tmp_path / f"pkg-{include_gitignore}-{len(excludes)}.zip"
    create_package(str(ROOT), out, include_gitignore=include_gitignore, excludes=excludes)
    assert out.stat().st_size < 5 * 2**20, f"working_dir package is {out.stat().st_size / 2**20:.1f} MiB"
    return zipfile.ZipFile(out).namelist()


def _assert_package_complete(names: list[str], what: str) -> None:
    got = set(names)
    needed = [str(p.relative_to(ROOT)) for p in (ROOT / "imgcls_dist").rglob("*.py") if "__pycache__" not in p.parts]
    needed += [f"jobs/{p.name}" for p in (ROOT / "jobs").glob("*.py")]
    needed += [f"configs/{p.name}" for p in (ROOT / "configs").glob("*.yaml")]
    missing = sorted(set(needed) - got)
    hint = (" - an unanchored `data/` in .gitignore also ignores imgcls_dist/data (Ray honours .gitignore "
            "when it packs the working dir): anchor it as `/data/`") if any(m.startswith("imgcls_dist/data/") for m in missing) else ""
    assert not missing, f"{what}: the job would run without {missing[:6]}{'...' if len(missing) > 6 else ''}{hint}"
    for bad in (".venv/", "runs/", "data/", ".git/", "imgcls_dist.egg-info/"):
        assert not any(n.startswith(bad) for n in names), f"{what}: uploads {bad}"
    assert not any("__pycache__" in n for n in names), what


def test_working_dir_upload_is_small_and_complete(tmp_path):
    excludes = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())["excludes"]
    # ray job submit honours .gitignore unless RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1; the excludes alone must do too.
    _assert_package_complete(_package(tmp_path, excludes, include_gitignore=True), "ray job submit --working-dir .")
    _assert_package_complete(_package(tmp_path, excludes, include_gitignore=False), "runtime_env excludes alone")


def test_rayjob_excludes_keep_the_image_copy_complete(tmp_path):
    # In the image (cluster/Dockerfile) there is no .gitignore: only the RayJob's excludes apply.
    for name, job in _rayjobs().items():
        excludes = yaml.safe_load(job["spec"]["runtimeEnvYAML"])["excludes"]
        _assert_package_complete(_package(tmp_path, excludes, include_gitignore=False), name)


# ------------------------------------------------------------------------------------------ e2e


def _job_server_missing() -> str | None:
    """Why `ray job submit` cannot work with this install, or None."""
    try:
        import ray.dashboard.optional_deps  # noqa: F401 - the dashboard serves its HTTP/job API only with these
        import requests  # noqa: F401 - the job client
    except ImportError as e:
        return (f"`ray job submit` needs the dashboard's job server from ray[default]; this venv lacks "
                f"{e.name!r} (pip install 'ray[default]')")
    return None


def _ray_client_installed() -> bool:
    from ray._private.utils import get_ray_client_dependency_error  # what `ray start` itself checks

    return get_ray_client_dependency_error() is None


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _ray_processes_of(pgid: int, temp_dir: Path) -> list[int]:
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

    def __init__(self, num_cpus: int = 2):
        # Short: Ray puts Unix sockets under it and AF_UNIX paths are capped at 107 bytes.
        self.temp_dir = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))
        (self.gcs_port, self.dashboard_port, self.client_port, self.agent_http_port, self.agent_grpc_port,
         self.runtime_env_agent_port, self.metrics_port) = _free_ports(7)
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
        })
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
               f"--num-cpus={self.num_cpus}", "--num-gpus=0", f"--temp-dir={self.temp_dir}", "--disable-usage-stats"]
        if _ray_client_installed():  # its server would otherwise take the fixed port 10001
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
        while (left := _ray_processes_of(proc.pid, self.temp_dir)) and time.monotonic() < deadline:
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


@pytest.fixture(scope="module")
def ray_head():
    head = RayHead(num_cpus=2)
    try:
        t0 = time.perf_counter()
        head.start(need_dashboard=_job_server_missing() is None)
        print(f"\nray head {head.gcs_address} (dashboard {head.dashboard_url}) up in {time.perf_counter() - t0:.1f}s")
        yield head
    finally:
        head.stop()


class _Done(subprocess.CompletedProcess):
    """A finished command: exit code, combined output and the pid it ran as."""

    def __init__(self, args, returncode, stdout, pid):
        super().__init__(args, returncode, stdout, None)
        self.pid = pid


def _run(cmd: list[str], *, cwd: Path, env: dict, timeout: float) -> _Done:
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # its own group: the client/driver and nothing else
        out, _ = proc.communicate()
        raise AssertionError(f"timed out after {timeout:.0f}s: {shlex.join(cmd)}\n{out[-6000:]}") from None
    return _Done(cmd, proc.returncode, out, proc.pid)


def _submit(head: RayHead, mode: str, script_args: list[str], name: str, tmp: Path, timeout: float) -> str:
    """Run `python <script_args>` as a job on the head, the way a user would; return its output."""
    if mode == "ray-job-submit":
        env_file = tmp / "runtime_env.yaml"
        if not env_file.exists():
            runtime_env = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
            # Every process of the job (driver, Train controller, workers) resolves this head even with
            # other Ray instances on the machine (the suite's own, other users').
            runtime_env.setdefault("env_vars", {})["RAY_ADDRESS"] = head.gcs_address
            env_file.write_text(yaml.safe_dump(runtime_env))
        sid = f"{name}-{secrets.token_hex(4)}"
        cmd = [str(RAY), "job", "submit", "--address", head.dashboard_url, "--submission-id", sid,
               "--working-dir", str(ROOT), "--runtime-env", str(env_file), "--", "python", *script_args]
        # From another directory: only the uploaded working dir may provide jobs/ and configs/.
        p = _run(cmd, cwd=tmp, env=head.env, timeout=timeout)
        status = _run([str(RAY), "job", "status", "--address", head.dashboard_url, sid], cwd=tmp, env=head.env,
                      timeout=60)
        # `ray job status` prints "Job '<id>' succeeded" (2.60); older releases printed SUCCEEDED.
        assert p.returncode == 0 and re.search(rf"{sid}' succeeded|SUCCEEDED", status.stdout), (
            f"{shlex.join(cmd)} -> exit {p.returncode}\n{p.stdout[-6000:]}\n--- ray job status\n{status.stdout}")
        assert (head.logs_dir / f"job-driver-{sid}.log").is_file()
        return p.stdout
    raise ValueError(mode)


@pytest.mark.e2e
@pytest.mark.timeout(600)
@pytest.mark.parametrize("mode", ["ray-job-submit"])
def test_train_then_batch_infer_on_a_started_head(mode, ray_head, tiny_digits_dir, tmp_path):
    import pyarrow.parquet as pq

    from imgcls_dist.models.checkpoint import load_model_file

    data = Path(tiny_digits_dir).resolve()
    storage, out = tmp_path / "runs", tmp_path / "predictions"
    t0 = time.perf_counter()

    # `ray status` reports once the autoscaler monitor has seen the node (a few seconds after start).
    for _ in range(20):
        status = _run([str(RAY), "status", "--address", ray_head.gcs_address], cwd=tmp_path, env=ray_head.env,
                      timeout=60)
        if status.returncode != 0 or re.search(rf"/{ray_head.num_cpus}\.0 CPU", status.stdout):
            break
        time.sleep(1)
    assert status.returncode == 0 and re.search(rf"/{ray_head.num_cpus}\.0 CPU", status.stdout), status.stdout

    train_out = _submit(ray_head, mode, [
        "jobs/train.py", "--config", "configs/lenet5_digits.yaml",
        "--set", f"data.path={data}", "--set", "data.image_size=16", "--set", "data.loader_workers=0",
        "--set", "train.epochs=1", "--set", "train.warmup_epochs=0",
        "--set", "run.name=submitted", "--set", f"run.storage_path={storage}",
        "--set", "scaling.num_workers=1", "--set", "run.tensorboard=false",
    ], "train", tmp_path, timeout=360)
    t_train = time.perf_counter()
    assert re.search(r"^epoch 1/1 .*val_acc", train_out, re.M), train_out[-3000:]

    run = storage / "submitted"
    for f in ("model.pt", "metrics.csv", "config.yaml", "summary.json"):
        assert (run / f).is_file(), f
    assert list(run.glob("checkpoint_*/model.pt")), "no Ray Train checkpoint in the run directory"
    assert len((run / "metrics.csv").read_text().strip().splitlines()) == 2
    model = load_model_file(run / "model.pt")
    assert model["arch"] == "lenet5" and model["image_size"] == 16 and len(model["classes"]) == 10

    infer_out = _submit(ray_head, mode, [
        "jobs/batch_infer.py", "--models", str(run / "model.pt"), "--input", str(data / "test"), "--output", str(out),
    ], "infer", tmp_path, timeout=360)
    t_infer = time.perf_counter()

    inputs = sorted((data / "test").glob("*.parquet"))
    rows = sum(pq.ParquetFile(f).metadata.num_rows for f in inputs)
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["rows_in"] == manifest["rows_out"] == rows, (manifest, infer_out[-2000:])
    assert manifest["error_rows"] == 0
    preds = [pq.read_table(f, columns=["id", "pred", "error"]) for f in sorted(out.glob("*.parquet"))]
    ids = [i for t in preds for i in t.column("id").to_pylist()]
    want = [i for f in inputs for i in pq.read_table(f, columns=["id"]).column("id").to_pylist()]
    assert len(ids) == rows and sorted(ids) == sorted(want)
    assert all(e is None for t in preds for e in t.column("error").to_pylist())
    print(f"\n[{mode}] train job {t_train - t0:.1f}s, batch-infer job {t_infer - t_train:.1f}s, {rows} rows")
