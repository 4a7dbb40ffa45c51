"""Joining a cluster or starting a local single-node Ray, and sizing work from what it holds."""

from __future__ import annotations

import logging
import os


def ensure_ray(num_cpus: int | None = None, quiet: bool = True) -> None:
    """Join RAY_ADDRESS / the `ray job submit` cluster, or start a local instance sized to this machine."""
    import ray

    if ray.is_initialized():
        return
    # Train V2 is the default in Ray 2.60; set it explicitly so older 2.x behave the same.
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    # WARNING for the job's Ray processes too: the per-epoch lines stay, Train's INFO chatter goes.
    common = dict(logging_level=logging.WARNING, configure_logging=True, log_to_driver=True,
                  logging_config=ray.LoggingConfig(encoding="TEXT", log_level="WARNING"))
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], **common)
        return
    ray.init(num_cpus=num_cpus or os.cpu_count() or 1, include_dashboard=False,
             runtime_env={"env_vars": {"RAY_TRAIN_V2_ENABLED": "1"}}, **common)


def cluster_cpus() -> float:
    import ray

    return float(ray.cluster_resources().get("CPU", 0.0))


def cluster_gpus() -> float:
    import ray

    return float(ray.cluster_resources().get("GPU", 0.0))


def available_cpus() -> float:
    import ray

    return float(ray.available_resources().get("CPU", 0.0))
