"""Test helper (no tests here): the worker processes of *our* Ray node, to kill one from outside as a crash would,
and waiting for a Ray's CPUs to be free again."""

from __future__ import annotations

import time

import psutil

from imgcls_dist.ray_utils import local_raylets


def ray_worker_processes(title: str) -> list[psutil.Process]:
    """Live worker processes of our node whose title (e.g. 'ray::RayTrainWorker') contains `title`."""
    found = []
    for raylet in local_raylets():
        try:
            children = raylet.children(recursive=True)
        except psutil.Error:
            continue
        for p in children:
            try:
                if title in " ".join(p.cmdline()) and p.status() != psutil.STATUS_ZOMBIE:
                    found.append(p)
            except psutil.Error:
                continue
    return found


def wait_all_cpus_free(ray, timeout=30.0) -> float:
    deadline = time.time() + timeout
    while time.time() < deadline:
        free = ray.available_resources().get("CPU", 0.0)
        if free >= ray.cluster_resources().get("CPU", 0.0):
            return free
        time.sleep(0.5)
    return ray.available_resources().get("CPU", 0.0)


def sigterm_when(proc, ready, log, timeout_s: float, exit_timeout_s: float) -> float:
    """SIGTERM `proc` once `ready()` holds (failing, with the end of its log, if it exits first or `timeout_s`
    passes), wait for it to exit, and return the seconds from the signal to the exit; killed if it does not."""
    import signal

    try:
        deadline = time.time() + timeout_s
        while not ready():
            assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        t0 = time.perf_counter()
        proc.wait(exit_timeout_s)
        return time.perf_counter() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
