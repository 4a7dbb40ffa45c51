"""The Ray switches we rely on where no other public API does the job: fail loudly when Ray changes them."""

from __future__ import annotations

import pyarrow.fs as pafs


def test_the_v1_parquet_datasource_switch_still_exists(ray_session, tmp_path):
    from ray.data import DataContext

    from imgcls_dist.data.shards import write_shards
    from benchmarks.ray_data_compat import read_parquet

    ctx = DataContext.get_current()
    assert isinstance(ctx.use_datasource_v2, bool) and isinstance(ctx.decoding_size_estimation, bool)
    before = ctx.use_datasource_v2
    files = write_shards([(f"r{i}", b"x", i % 3) for i in range(10)], tmp_path, rows_per_shard=4)
    ds = read_parquet([f.path for f in files], filesystem=pafs.LocalFileSystem(), columns=["id", "label"], num_cpus=0.5)
    assert sorted(r["id"] for r in ds.take_all()) == sorted(f"r{i}" for i in range(10))
    assert ctx.use_datasource_v2 == before  # restored for everything else


def test_train_propagates_its_environment_switches_to_the_controller():
    # train/job.py and tune/trial.py set these in the driver and rely on Train passing them on.
    from ray.train.v2._internal.constants import ENV_VARS_TO_PROPAGATE

    assert {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"} <= ENV_VARS_TO_PROPAGATE
