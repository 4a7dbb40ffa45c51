"""`python -m benchmarks fuzz --target readers`: the reader campaign, its cases run in spawned child processes
under time and memory limits, with a table of outcomes per reader.

Reader cases (`--target readers`): corrupted copies of `ensemble.json`, a bulk job's `_manifest.json`, a staged
part's Parquet footer, `_resume.json` and lease files, `dataset.json`, `model.pt` (hostile pickles among them) and
configs (YAML tags, `--set` overrides), each read by its reader: a result or the reader's one-line refusal, never
another exception, and never code from the file run.

The cases come from benchmarks/reader_fuzz_cases.py (reproducible from (seed, index) alone:
`reader_case(S, i, reader_seeds(dir))`), their reading and contracts from benchmarks/reader_fuzz_contract.py.
"""

from __future__ import annotations

import faulthandler
import io
import multiprocessing
import resource
import signal
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

from benchmarks.common import machine
from benchmarks.fuzz_bench import SLOW_S, run_pool
from benchmarks.reader_fuzz_cases import EXECUTED, ReaderCase, malicious_model, marker_name, reader_case, torch_saved
from benchmarks.reader_fuzz_contract import CaseTimeout, prepare_workspace, reader_outcome
from benchmarks.reader_fuzz_seeds import READERS, ReaderSeeds, reader_seeds
from imgcls_dist.table import format_table

READER_CHUNK = 200
CASE_LIMIT_S = 10.0  # a reader case still running after this is stopped (SIGALRM) and counted as a hang
KILL_S = 30.0  # a worker stuck in native code (where SIGALRM cannot reach) is killed after this: a crashed chunk
ADDRESS_SPACE = 6 << 30  # per reader worker (RLIMIT_AS); importing torch and pyarrow maps ~3.6 GiB of it


# ---------------------------------------------------------------- the campaign, in child processes

_WORKER: dict[str, Any] = {}  # a reader worker's seeds and workspace


def _on_alarm(signum, frame) -> None:
    if _WORKER.get("in_case"):
        raise CaseTimeout()


def init_reader_worker(seeds: ReaderSeeds, root: str) -> None:
    """A reader worker: its memory capped, its own workspace, every reader run once unmeasured (first calls
    import pyarrow's parts, torchvision's model list for an unknown arch and more: seconds that are no case's)."""
    import torch

    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))
    torch.set_num_threads(1)  # the workers are the parallelism
    warnings.simplefilter("ignore")  # torch warns about some damaged files (an odd pickle protocol): no outcome
    ws = prepare_workspace(Path(tempfile.mkdtemp(dir=root)), seeds)
    _WORKER.update(seeds=seeds, ws=ws)
    signal.signal(signal.SIGALRM, _on_alarm)
    for reader in READERS:
        reader_outcome(ReaderCase(reader, "seed", seeds.files[reader]), ws, seeds, EXECUTED)
    unknown_arch = {**torch.load(io.BytesIO(seeds.files["model"]), weights_only=True), "arch": "no-such-model"}
    for model in (malicious_model(EXECUTED, 0), torch_saved(unknown_arch)):
        reader_outcome(ReaderCase("model", "seed", model), ws, seeds, EXECUTED)


def _empty_stats() -> dict[str, Any]:
    return {"cases": 0, "ok": 0, "refused": 0, "violations": [], "slow": [], "max_s": 0.0, "max_cpu_s": 0.0,
            "slowest": None}


def _timed_outcome(case: ReaderCase, ws: Path, seeds: ReaderSeeds, marker: str) -> tuple[str, str | None]:
    """reader_outcome within the case's time limits: SIGALRM at CASE_LIMIT_S, a killed worker at KILL_S."""
    signal.setitimer(signal.ITIMER_REAL, CASE_LIMIT_S)
    faulthandler.dump_traceback_later(KILL_S, exit=True)
    _WORKER["in_case"] = True
    try:
        return reader_outcome(case, ws, seeds, marker)
    except CaseTimeout:
        return "violation", f"hang: stopped after {CASE_LIMIT_S:g}s"
    finally:
        _WORKER["in_case"] = False
        signal.setitimer(signal.ITIMER_REAL, 0)
        faulthandler.cancel_dump_traceback_later()


def run_reader_chunk(seed: int, start: int, count: int) -> dict[str, dict[str, Any]]:
    """Cases start..start+count in this worker: per reader, counts, contract violations, slow cases. A case is
    slow by its CPU time: on a machine shared with other work the wall time also counts the waits for a core."""
    seeds, ws = _WORKER["seeds"], _WORKER["ws"]
    out = {r: _empty_stats() for r in READERS}
    for i in range(start, start + count):
        case = reader_case(seed, i, seeds)
        t0, c0 = time.perf_counter(), time.process_time()
        outcome, why = _timed_outcome(case, ws, seeds, marker_name(seed, i))
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        stats = out[case.reader]
        stats["cases"] += 1
        if outcome != "violation":
            stats[outcome] += 1
        stats["max_s"] = max(stats["max_s"], dt)
        if cpu > stats["max_cpu_s"]:
            stats["max_cpu_s"], stats["slowest"] = cpu, (i, case.mutation)
        if why:
            stats["violations"].append((i, case.mutation, why))
        if cpu > SLOW_S:
            stats["slow"].append((i, case.mutation, round(cpu, 2)))
    return out


def _merge(total: dict[str, dict[str, Any]], part: dict[str, dict[str, Any]]) -> None:
    for reader, s in part.items():
        t = total[reader]
        for k in ("cases", "ok", "refused"):
            t[k] += s[k]
        t["violations"] += s["violations"]
        t["slow"] += s["slow"]
        t["max_s"] = max(t["max_s"], s["max_s"])
        if s["max_cpu_s"] > t["max_cpu_s"]:
            t["max_cpu_s"], t["slowest"] = s["max_cpu_s"], s["slowest"]


def bench_reader_fuzz(cases: int = 16_000, seed: int = 0, workers: int = 2) -> dict[str, Any]:
    """The reader campaign: `cases` cases, READERS in turn, in `workers` spawned processes."""
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="imgcls-reader-fuzz-") as root:
        seeds = reader_seeds(Path(root) / "seed")
        setup = time.perf_counter() - t0
        # spawn, not fork: the seeds were written with torch, whose thread pools do not survive a fork
        results, crashed = run_pool(run_reader_chunk, [(seed, s, min(READER_CHUNK, cases - s))
                                                       for s in range(0, cases, READER_CHUNK)], workers,
                                    mp_context=multiprocessing.get_context("spawn"),
                                    initializer=init_reader_worker, initargs=(seeds, root))
    wall = time.perf_counter() - t0
    total = {r: _empty_stats() for r in READERS}
    for r in results:
        _merge(total, r)
    workers_use = resource.getrusage(resource.RUSAGE_CHILDREN)  # the workers, reaped when the pool closed
    rss_mb, cpu_s = workers_use.ru_maxrss / 1024, workers_use.ru_utime + workers_use.ru_stime
    n = sum(t["cases"] for t in total.values())
    violations = sum(len(t["violations"]) for t in total.values())
    slow = sum(len(t["slow"]) for t in total.values())
    hangs = sum(v[2].startswith("hang") for t in total.values() for v in t["violations"])
    print(f"{machine()}\nfuzz readers: {n} cases (seed {seed}) in {wall:.0f}s ({setup:.0f}s writing the seed files; "
          f"{cpu_s:.0f}s of CPU in the workers), {n / wall:.0f} cases/s; contract violations {violations}, slow "
          f"(> {SLOW_S:g}s of CPU) {slow}, hangs (> {CASE_LIMIT_S:g}s) {hangs}, crashed chunks {len(crashed)} "
          f"(goal: 0, 0, 0, 0); largest worker {rss_mb:.0f} MB resident, address space capped at "
          f"{ADDRESS_SPACE >> 30} GiB")
    rows = [(r, *(str(t[k]) for k in ("cases", "ok", "refused")), str(len(t["violations"])),
             f"{t['max_cpu_s'] * 1e3:.0f} ms", f"{t['slowest'][1]} #{t['slowest'][0]}" if t["slowest"] else "-",
             f"{t['max_s'] * 1e3:.0f} ms") for r, t in total.items()]
    print(format_table(("reader", "cases", "ok", "refused", "violations", "slowest (CPU)", "that case",
                        "slowest (wall)"), rows))
    for r, t in total.items():
        for v in t["violations"][:5]:
            print(f"  {r} case {v[0]} ({v[1]}): {v[2]}")
    return {"machine": machine(), "wall_s": wall, "setup_s": setup, "workers_cpu_s": cpu_s, "readers": total,
            "crashed_chunks": [c[1] for c in crashed], "max_rss_mb": rss_mb}
