"""ingest's progress line (data/ingest.py): an ETA once files are done, no 'nan' before."""

import time

from imgcls_dist.data.ingest import _progress_line


def test_no_eta_before_the_first_files_then_one_from_the_rate():
    t0 = time.perf_counter() - 10.0
    assert _progress_line(0, 3, 0, 180, 0, t0).endswith("0 files/s, ETA unknown until a shard is done")
    line = _progress_line(1, 3, 60, 180, 2, t0)
    assert "60/180 files (2 skipped), 6 files/s, ETA 20s" in line  # 120 files left at ~6 a second
