"""`python -m benchmarks fuzz --target decode`: the decoder's campaign, hostile bytes for `decode_image`; and
`run_pool`, the process pool both fuzz campaigns (this one and benchmarks/reader_fuzz_bench.py) run their cases in.

Decode cases: `decode_image` on random bytes, and valid small files of every whitelisted format (JPEG, PNG, WebP,
BMP, GIF, TIFF) mutated by seeded byte flips, truncations, inserted and repeated chunks, and header dimension
bombs. Every case must honour the decoder's contract (an HxWxC uint8 array xor a one-line error, never an
exception), and finish in time.

The cases run in child processes, so a crash of native code (a segfault) is seen as a broken pool, not as the
benchmark dying. No fuzzing library: a seeded mutator is enough for contracts of the kind "anything in, no
exception out", and it makes every reported case reproducible from (seed, index) alone (`--seed S`;
`case(S, i, seed_files())`, `reader_case(S, i, reader_seeds(dir))`).
"""

from __future__ import annotations

import io
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable

import numpy as np
from PIL import Image

from benchmarks.common import machine

FORMATS = {"JPEG": {}, "PNG": {}, "WEBP": {"quality": 80}, "BMP": {}, "GIF": {}, "TIFF": {}}
SLOW_S = 2.0  # a case slower than this counts as a hang
CHUNK = 500


def seed_files() -> dict[str, bytes]:
    """One small valid file per whitelisted format (24x16, a gradient with noise: every decoder path has data)."""
    rng = np.random.default_rng(0)
    pixels = (np.linspace(0, 255, 24 * 16 * 3).reshape(16, 24, 3) + rng.integers(0, 40, (16, 24, 3))) % 256
    img = Image.fromarray(pixels.astype(np.uint8))
    out = {}
    for fmt, kw in FORMATS.items():
        buf = io.BytesIO()
        (img.convert("P") if fmt == "GIF" else img).save(buf, format=fmt, **kw)
        out[fmt] = buf.getvalue()
    return out


def mutate(data: bytes, rng: np.random.Generator) -> bytes:
    """One of: flip 1-16 bytes, truncate, insert random bytes, repeat a chunk, or overwrite a 4-byte word near the
    start with a huge or zero value (where dimensions live in most headers)."""
    b = bytearray(data)
    kind = int(rng.integers(5))
    if kind == 0:
        for pos in rng.integers(0, len(b), int(rng.integers(1, 17))):
            b[pos] = int(rng.integers(256))
    elif kind == 1:
        del b[int(rng.integers(0, len(b))):]
    elif kind == 2:
        pos = int(rng.integers(0, len(b) + 1))
        b[pos:pos] = rng.integers(0, 256, int(rng.integers(1, 64)), dtype=np.uint8).tobytes()
    elif kind == 3:
        start = int(rng.integers(0, len(b)))
        chunk = b[start:start + int(rng.integers(1, 128))]
        b[start:start] = chunk * int(rng.integers(1, 8))
    else:
        pos = int(rng.integers(0, min(len(b), 64)))
        word = rng.choice([0xFFFFFFFF, 0x7FFFFFFF, 0x00010000, 0, 0xFFFF]).item()
        b[pos:pos + 4] = word.to_bytes(4, "big" if rng.integers(2) else "little")
    return bytes(b)


def case(seed: int, index: int, seeds: dict[str, bytes]) -> tuple[str, bytes]:
    """(what it is, its bytes): case `index` of the run seeded `seed`; one in ten is random bytes."""
    rng = np.random.default_rng([seed, index])
    if index % 10 == 0:
        return "random", rng.integers(0, 256, int(rng.integers(0, 512)), dtype=np.uint8).tobytes()
    fmt = list(seeds)[index % len(seeds)]
    data = seeds[fmt]
    for _ in range(int(rng.integers(1, 4))):
        data = mutate(data, rng) or data[:1]
    return fmt, data


def contract_violation(result) -> str | None:
    """Why a DecodeResult breaks the decoder's contract, or None."""
    arr, err = result
    if (arr is None) == (err is None):
        return "exactly one of array and error must be set"
    if err is not None:
        return None if err and "\n" not in err and len(err) <= 200 else f"error not one short line: {err!r}"
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] not in (1, 3) or not arr.flags.c_contiguous:
        return f"array {arr.dtype} {arr.shape}"
    return None


def run_chunk(seed: int, start: int, count: int) -> dict[str, Any]:
    """Cases start..start+count in this process: counts, contract violations, exceptions, slow cases."""
    from imgcls_dist.data.decode import decode_image

    seeds, out = seed_files(), {"cases": 0, "decoded": 0, "violations": [], "slow": [], "max_s": 0.0}
    for i in range(start, start + count):
        kind, data = case(seed, i, seeds)
        t0 = time.perf_counter()
        try:
            result = decode_image(data, channels=3, max_pixels=4_000_000, min_size=(None, 8)[i % 2])
            why = contract_violation(result)
        except BaseException as exc:  # noqa: BLE001 - what the contract forbids is what is counted
            result, why = (None, None), f"raised {type(exc).__name__}: {exc}"
        dt = time.perf_counter() - t0
        out["cases"] += 1
        out["decoded"] += result[0] is not None
        out["max_s"] = max(out["max_s"], dt)
        if why:
            out["violations"].append((i, kind, why))
        if dt > SLOW_S:
            out["slow"].append((i, kind, round(dt, 2)))
    return out


def bench_fuzz(cases: int = 100_000, seed: int = 0, workers: int = 2) -> dict[str, Any]:
    t0 = time.perf_counter()
    total = {"cases": 0, "decoded": 0, "violations": [], "slow": [], "max_s": 0.0}
    results, crashed = run_pool(run_chunk, [(seed, s, min(CHUNK, cases - s)) for s in range(0, cases, CHUNK)],
                                workers)
    for r in results:
        for k in ("cases", "decoded"):
            total[k] += r[k]
        total["violations"] += r["violations"]
        total["slow"] += r["slow"]
        total["max_s"] = max(total["max_s"], r["max_s"])
    total["crashed_chunks"] = [c[1] for c in crashed]
    wall = time.perf_counter() - t0
    print(f"{machine()}\nfuzz decode_image: {total['cases']} cases (seed {seed}) in {wall:.0f}s, "
          f"{total['cases'] / wall:.0f} cases/s; decoded {total['decoded']}, errors "
          f"{total['cases'] - total['decoded']}; contract violations {len(total['violations'])}, "
          f"slow (> {SLOW_S:g}s) {len(total['slow'])}, slowest {total['max_s'] * 1e3:.0f} ms, crashed chunks "
          f"{len(total['crashed_chunks'])} (goal: 0, 0, 0)")
    for v in total["violations"][:10]:
        print(f"  case {v[0]} ({v[1]}): {v[2]}")
    return {"machine": machine(), "wall_s": wall, **total}


# ---------------------------------------------------------------- the process pool, shared with the reader campaign


def run_pool(fn: Callable[..., Any], jobs: list[tuple], workers: int, **pool_kw) -> tuple[list[Any], list[tuple]]:
    """fn(*job) for every job in child processes: (results, jobs whose worker died). A native crash breaks the
    whole pool, so the jobs that came back broken run again one at a time in a fresh pool: a crash is pinned on
    its own job, and the jobs that were merely beside it still count."""
    results, broken = [], []
    with ProcessPoolExecutor(workers, **pool_kw) as pool:
        for job, fut in [(job, pool.submit(fn, *job)) for job in jobs]:
            try:
                results.append(fut.result())
            except BrokenProcessPool:
                broken.append(job)
    crashed = []
    while broken:
        with ProcessPoolExecutor(1, **pool_kw) as pool:
            futures, broken = [(job, pool.submit(fn, *job)) for job in broken], []
            for k, (job, fut) in enumerate(futures):
                try:
                    results.append(fut.result())
                except BrokenProcessPool:  # one worker, in order: this job is the one that crashed
                    crashed.append(job)
                    broken = [j for j, _ in futures[k + 1:]]
                    break
    return results, crashed
