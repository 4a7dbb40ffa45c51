"""`python -m benchmarks bulk-preempt`: how much of a bulk `infer` job a rerun repeats after the driver is ended
part-way, by SIGKILL (nothing to save) and by SIGTERM (the job writes what it has predicted and exits).

The input is laid out the hard way: 12 files of 1,000 rows, each file one row group (pyarrow's default for a
file of fewer than a million rows). A clean run is timed first; then a run is SIGKILLed, and another
SIGTERMed, at 60 % of the clean run's wall time, and each is rerun to completion. Every run is the CLI as
users run it (`imgcls-dist infer` in its own process), attached to one Ray started here, so Ray's own start
is in none of the times. Printed: rows written when the driver ended, the rerun's wall time and its ratio to
the clean run's. Model: resnet18, random init, one view (speed does not depend on the weights), at 160 px by
default, sized so that prediction, not the job's fixed start (a process, Ray Data's plan, an actor importing torch
and loading the model: about ten seconds), is most of a clean run: a rerun can never take less than the start
plus the rows left, so after a signal at 60 % its ratio is at least 0.40 + start / clean. The start is measured
too: when the clean run's first part lands.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from benchmarks.common import machine, print_table
from benchmarks.infer_bench import make_bench_model
from benchmarks.precision_bench import _dataset

FILES, ROWS_PER_FILE = 12, 1000
AT = 0.6  # of the clean run's wall time
SIZE = 160


def write_inputs(work: Path) -> Path:
    """FILES files of ROWS_PER_FILE rows, one row group each: the digits' test images repeated, unique ids."""
    from imgcls_dist.data.schema import ID

    inp = work / "input"
    if len(list(inp.glob("*.parquet"))) == FILES:
        return inp
    inp.mkdir(parents=True, exist_ok=True)
    base = pq.read_table(sorted((_dataset(None, work) / "test").glob("*.parquet")))
    n = FILES * ROWS_PER_FILE
    rows = base.take(pa.array([k % base.num_rows for k in range(n)]))
    rows = rows.set_column(rows.schema.get_field_index(ID), ID, pa.array([f"r{k:06d}" for k in range(n)]))
    for i in range(FILES):
        part = rows.slice(i * ROWS_PER_FILE, ROWS_PER_FILE)
        pq.write_table(part, inp / f"part-{i:03d}.parquet", row_group_size=ROWS_PER_FILE)
    return inp


def _staged_rows(out: Path) -> int:
    n = 0
    for f in out.glob(".staging-*/*.parquet"):
        try:
            n += pq.ParquetFile(f).metadata.num_rows
        except OSError:
            pass  # renamed or deleted meanwhile
    return n


def _infer(model: Path, inp: Path, out: Path, log: Path, fresh: bool = False) -> subprocess.Popen:
    """`imgcls-dist infer` in its own process; fresh: the output of an earlier benchmark run goes first."""
    import ray

    if fresh:
        shutil.rmtree(out, ignore_errors=True)

    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    cmd = [sys.executable, "-m", "imgcls_dist.cli", "infer", "--models", str(model), "--input", str(inp),
           "--output", str(out), "--tta", "none", "--batch-size", "64"]
    return subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)


def _timed(model: Path, inp: Path, out: Path, log: Path, fresh: bool) -> tuple[float, float | None]:
    """(wall s, s until the first part landed, None if the run wrote none of its own)."""
    t0 = time.perf_counter()
    proc = _infer(model, inp, out, log, fresh)
    first = None
    while proc.poll() is None:
        if first is None and _staged_rows(out):
            first = time.perf_counter() - t0
        time.sleep(0.1)
    if proc.returncode != 0:
        raise RuntimeError(f"infer failed, see {log}")
    return time.perf_counter() - t0, first


def _wait_cpus_free(timeout_s: float = 120) -> None:
    """An ended driver's actors go when Ray notices its job ended; the rerun must not start behind them."""
    import ray

    deadline = time.time() + timeout_s
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"] and time.time() < deadline:
        time.sleep(0.2)


def _ended(model: Path, inp: Path, out: Path, log: Path, sig: int, after_s: float) -> dict[str, Any]:
    proc = _infer(model, inp, out, log, fresh=True)
    time.sleep(after_s)
    proc.send_signal(sig)
    t0 = time.perf_counter()
    code = proc.wait()
    exit_s = time.perf_counter() - t0
    written = _staged_rows(out)
    _wait_cpus_free()
    rerun, _ = _timed(model, inp, out, log.with_suffix(".rerun.log"), fresh=False)
    return {"exit status": code, "exit s": exit_s, "rows written": written, "rerun s": rerun}


def bench_bulk_preempt(workdir: str = "runs/bench_bulk_preempt", size: int = SIZE) -> dict[str, Any]:
    from imgcls_dist.ray_utils import ensure_ray

    work = Path(workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    model, _ = make_bench_model(work, "resnet18", size)
    inp = write_inputs(work)
    ensure_ray()
    _timed(model, inp / "part-000.parquet", work / "warmup", work / "warmup.log", fresh=True)  # imports, page cache
    clean, first_part = _timed(model, inp, work / "clean", work / "clean.log", fresh=True)
    arms = {name: _ended(model, inp, work / name, work / f"{name}.log", sig, AT * clean)
            for name, sig in (("SIGKILL", signal.SIGKILL), ("SIGTERM", signal.SIGTERM))}
    rows = FILES * ROWS_PER_FILE
    table = [{"arm": "clean run", "exit status": 0, "exit s": None, "rows written": rows, "rerun s": clean,
              "rerun / clean": 1.0}]
    table += [{"arm": f"{name} at {AT:.0%}", **r, "rerun / clean": r["rerun s"] / clean} for name, r in arms.items()]
    print(f"\n{machine()}\nbulk infer of {rows} rows in {FILES} files of one row group each, resnet18@{size}, 1 view; "
          f"driver ended at {AT:.0%} of the clean run's {clean:.1f} s, then rerun; the clean run's first part "
          f"landed after {first_part:.1f} s (a rerun's floor: {1 - AT + first_part / clean:.2f} of a clean run)")
    print_table(table, ["arm", "exit status", "exit s", "rows written", "rerun s", "rerun / clean"])
    return {"machine": machine(), "clean_s": clean, "first_part_s": first_part, "table": table}
