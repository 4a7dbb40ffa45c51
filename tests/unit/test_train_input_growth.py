"""The training input path holds a bounded amount of memory however much it streams: after warm-up (the
shuffle buffer filled, the read-ahead in flight) anonymous memory does not grow with the row groups read.

Measured in a fresh process, through the real reader thread, shuffle buffer and a DataLoader process
(`benchmarks.train_memory_bench.stream_epoch`), on incompressible rows: a reader that kept what it read
alive would grow by a row group's bytes for every row group."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ROWS, ROW_GROUP = 6000, 50

MEASURE = """
import json, sys
from pathlib import Path
from benchmarks.train_memory_bench import noise_pngs, write_split, stream_epoch
out = Path(sys.argv[1])
write_split(out, {rows}, {row_group}, noise_pngs(256, side=96))
files = sorted(str(f) for f in out.glob("*.parquet"))
print(json.dumps(stream_epoch(files, loader_workers=1, shuffle_buffer=256, keep_series=True,
                              interval=0.05)))
"""


def test_memory_after_warm_up_does_not_grow_with_the_row_groups_read(tmp_path):
    out = subprocess.run([sys.executable, "-c", MEASURE.format(rows=ROWS, row_group=ROW_GROUP), str(tmp_path / "s")],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["samples"] == ROWS
    group_mb = r["gb"] * 1024 / (ROWS / ROW_GROUP)
    series = r["series"]  # [rows done, summed anonymous MB of this process and its DataLoader process]
    warm = [mb for done, mb in series if ROWS * 0.2 <= done < ROWS * 0.3]
    late = [mb for done, mb in series if done >= ROWS * 0.3]
    groups_after = ROWS * 0.7 / ROW_GROUP  # row groups read after the warm-up window
    assert warm and len(late) >= 5, series
    growth = max(late) - min(warm)
    # Bound: a quarter of a row group's bytes per row group read (a reader keeping each group alive grows by
    # all of it), plus 16 MB for allocator noise.
    assert growth <= 0.25 * group_mb * groups_after + 16, (growth, group_mb, series)
