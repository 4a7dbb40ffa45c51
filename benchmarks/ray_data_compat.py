"""Parquet reads through Ray Data's V1 datasource, steering clear of a Ray 2.60 bug. Only a benchmark reads
shards this way (the Ray Data arm of `python -m benchmarks train-ingest`); the batch job reads through its
own Datasource (`imgcls_dist/batch/parts.py::ShardRows`).

Ray 2.60's default Parquet path (DataSourceV2: ListFiles -> ReadFiles) lists files with a threaded work
queue whose completion thread is interrupted when the driver stops iterating early (schema sampling), and
the thread dies with a traceback on the job's console, intermittently (seen in `make demo`: 1 of 3 infer
runs printed "Exception in thread pool-2/completion-signaler ... InterruptedError" from
ray/data/_internal/dynamic_work_queue.py). `DataContext.use_datasource_v2` is the documented switch
(also `RAY_DATA_USE_DATASOURCE_V2=0`). Drop this module when a Ray release joins that thread before
interrupting its queue; tests/ray/test_ray_compat.py fails loudly if the switch itself disappears.
"""

from __future__ import annotations

from typing import Sequence


def read_parquet(paths: Sequence[str], *, filesystem, columns: list[str], num_cpus: float):
    import ray
    from ray.data import DataContext

    ctx = DataContext.get_current()
    # No decoding-size sampling either: it runs extra Ray tasks (seconds of worker start-up per job) to
    # estimate a decompression ratio that is ~1 for already-compressed image bytes.
    saved = ctx.use_datasource_v2, ctx.decoding_size_estimation
    ctx.use_datasource_v2, ctx.decoding_size_estimation = False, False
    try:
        return ray.data.read_parquet(list(paths), filesystem=filesystem, columns=columns, num_cpus=num_cpus)
    finally:
        ctx.use_datasource_v2, ctx.decoding_size_estimation = saved
