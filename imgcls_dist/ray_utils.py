"""Joining a cluster or starting a local single-node Ray, and sizing work from what it holds."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from imgcls_dist.errors import UserError
from imgcls_dist.ports import free_port


def ensure_ray(num_cpus: int | None = None) -> None:
    """Join RAY_ADDRESS / the `ray job submit` cluster, or start a local instance sized to this machine.

    The local instance runs the dashboard because Ray's State API lives there, and Train's
    PlacementGroupCleaner needs it: without it the cleaner warns once a second for the whole run and
    cannot free the CPUs of a Train run whose controller died (a stopped Tune trial). It listens on
    127.0.0.1 only, on a free port, and every process of the job is told that address
    (RAY_API_SERVER_ADDRESS): the cleaner's State API client otherwise looks for "the" local Ray
    instance and dies with "Found multiple active Ray instances" when the machine runs another one.
    """
    import ray

    from imgcls_dist.console import quiet_ray_console

    if ray.is_initialized():
        return
    # Train V2 is the default in Ray 2.60; set it explicitly so older 2.x behave the same.
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    quiet_ray_console()
    # WARNING for the job's Ray processes too: the per-epoch lines stay, Train's INFO chatter goes.
    common = dict(logging_level=logging.WARNING, configure_logging=True, log_to_driver=True,
                  logging_config=ray.LoggingConfig(encoding="TEXT", log_level="WARNING"))
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], **common)
        return
    port = free_port()
    api = {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}  # for the job's processes, not this one's
    # address="local": always a new instance (a bare init would join a cluster that `ray start` left on this
    # machine, and refuse num_cpus there).
    ray.init(address="local", num_cpus=num_cpus or os.cpu_count() or 1, include_dashboard=True,
             dashboard_host="127.0.0.1", dashboard_port=port,
             runtime_env={"env_vars": {"RAY_TRAIN_V2_ENABLED": "1", **api},
                          "worker_process_setup_hook": "imgcls_dist.console.quiet_ray_workers"}, **common)


def cluster_cpus() -> float:
    import ray

    return float(ray.cluster_resources().get("CPU", 0.0))


def cluster_gpus() -> float:
    import ray

    return float(ray.cluster_resources().get("GPU", 0.0))


def available_cpus() -> float:
    import ray

    return float(ray.available_resources().get("CPU", 0.0))


def local_raylets() -> list:
    """psutil processes of the raylets on this machine that belong to the connected cluster: their children
    are this cluster's worker processes (matching "ray::" titles would also find other Ray instances)."""
    import psutil
    import ray

    gcs = ray.get_runtime_context().gcs_address
    found = []
    for p in psutil.process_iter(["name", "cmdline"]):
        cmd = " ".join(p.info.get("cmdline") or [])
        if "raylet" in (p.info.get("name") or "") and gcs in cmd:
            found.append(p)
    return found


@dataclass(frozen=True)
class WorkerPlan:
    """Train workers that fit the cluster: asking for more than it holds would make Train wait forever."""

    num_workers: int
    use_gpu: bool


def plan_workers(num_workers: int | None, use_gpu: bool | None, cpus_per_worker: float, cpus: float,
                 gpus: float, *, default_workers: int | None = None, who: str = "the run") -> WorkerPlan:
    """The one rule for how many Train workers a run gets, and on what (train and every tune trial).

    num_workers None: `default_workers`, or as many as fit (one per GPU, else one per cpus_per_worker).
    use_gpu None: when the cluster has GPUs.
    """
    gpu = use_gpu if use_gpu is not None else gpus > 0
    if gpu and gpus == 0:
        raise UserError("scaling.use_gpu: true but the Ray cluster has no GPUs")
    fit = int(gpus) if gpu else int(cpus // cpus_per_worker + 1e-9)
    n = num_workers or default_workers or max(1, fit)
    if gpu and n > gpus:
        raise UserError(f"scaling: {who} needs {n} GPU worker(s) but the Ray cluster has {gpus:g} GPUs "
                        "(it would wait forever)")
    if n * cpus_per_worker > cpus + 1e-9:
        raise UserError(f"scaling: {who} needs {n} worker(s) x {cpus_per_worker:g} CPU = {n * cpus_per_worker:g} "
                        f"CPUs but the Ray cluster has {cpus:g} (it would wait forever)")
    return WorkerPlan(n, bool(gpu))
