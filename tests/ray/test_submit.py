"""What a user does to run the jobs on a cluster, on a real Ray head started with the `ray` CLI.

* Fast checks of cluster/: every YAML parses; the launcher config validates against Ray's own schema;
  the KubeRay RayJobs name real entrypoints whose arguments the CLI and the config model accept; the
  working_dir that `ray job submit` would upload (Ray's own packaging code, .gitignore honoured as
  Ray does by default) holds the whole package and none of .venv/runs/data.
* The e2e part - `ray start --head`, `ray job submit --working-dir <repo> -- python jobs/train.py ...`, then
  jobs/batch_infer.py on the run's model, `ray job status` SUCCEEDED, artifacts where docs/cluster.md says -
  runs in tests/ray/test_node_failure.py, on its 2-node cluster: its training and batch-inference jobs are the
  submitted ones (one cluster and two jobs fewer for the suite; helpers in tests/helpers/ray_cluster.py).
"""

from __future__ import annotations

import json
import re
import shlex
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
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
        configs = [ROOT / c for c in args.config]  # --config may be repeated
        assert configs and all(c.is_file() for c in configs)
        cfg = load_config(configs, args.overrides)  # unknown keys / bad values raise
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
