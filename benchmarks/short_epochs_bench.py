"""`python -m benchmarks short-epochs`: a small-data run (10 digits per class, LeNet-5, 30 epochs of 4 steps) with
Ray Train's controller polling its workers at Train's default interval (2 s) and at ours (0.25 s): a worker's
epoch report waits until the controller has taken the previous one, so epochs shorter than the interval last
the interval."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from benchmarks.common import machine, print_table
from imgcls_dist.config import build_config

INTERVAL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"


def _run(data: Path, storage: Path, interval: str) -> dict[str, Any]:
    from imgcls_dist.train.job import run_training
    from imgcls_dist.train.recipes import quickstart_raw

    raw, _, _ = quickstart_raw(str(data), "lenet5", "small_images")
    cfg = build_config(raw, ["data.train_per_class=10", "train.min_steps=null", "train.epochs=30",
                             f"run.storage_path={storage}", f"run.name=interval_{interval}", "run.tensorboard=false",
                             "scaling.num_workers=1", "data.loader_workers=0"])
    os.environ[INTERVAL_ENV] = interval
    t0 = time.perf_counter()
    try:
        res = run_training(cfg, report_test=False)
    finally:
        del os.environ[INTERVAL_ENV]
    wall = time.perf_counter() - t0
    return {"poll_interval_s": float(interval), "epochs": res["epochs"], "wall_s": round(wall, 1),
            "s_per_epoch": round(wall / res["epochs"], 2), "best_val_acc": res["best_val_acc"]}


def bench_short_epochs(workdir: str = "runs/bench_short_epochs") -> dict[str, Any]:
    from imgcls_dist.data.ingest import ingest
    from imgcls_dist.ray_utils import ensure_ray

    work = Path(workdir).resolve()
    data = work / "data" / "digits"
    if not (data / "dataset.json").is_file():
        ingest("builtin:digits", data, image_size=32, seed=0, verbose=False)
    ensure_ray()  # started once, outside the timings
    rows = [_run(data, work / "runs", iv) for iv in ("2.0", "0.25")]
    ratio = rows[0]["wall_s"] / rows[1]["wall_s"]
    print(f"bench short-epochs: lenet5, 10 images per class, 30 epochs - {machine()}")
    print_table(rows, list(rows[0]))
    print(f"the run at Train's default poll interval takes {ratio:.2f}x as long as at ours")
    return {"machine": machine(), "rows": rows, "ratio": ratio}
