"""Test helper (no tests here): the worker processes of *our* Ray node, to kill one from outside as a crash would."""

from __future__ import annotations

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
