"""`imgcls-dist ingest SRC OUT`: an image tree (local, s3://, gs://) or `builtin:NAME` -> Parquet shards + dataset.json.

Listing first (paths and labels only, `data/listing.py`), then the split, then one Ray task per output
shard that reads its files, checks that they decode and writes the shard: no process ever holds more
than one shard's bytes, and the driver holds only the listing. Own tasks rather than Ray Data's
`read_binary_files`: the split and the shard contents are decided from the listing before any byte is
read (stratified, seeded, reproducible file names), which a Ray Data write — one file per block, in
block order — cannot promise; a task that fails is retried by Ray and rewrites the same file. dataset.json
is written last: a directory without it is no dataset (train refuses it), so a crashed ingest never
passes for a finished one.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

import numpy as np
from sklearn.model_selection import train_test_split

from imgcls_dist.data.builtin import builtin_classes, builtin_rows
from imgcls_dist.data.decode import decode_image
from imgcls_dist.data.listing import Listing, keep_classes, list_image_tree, relabel_classes
from imgcls_dist.data.schema import DATASET_FILE, SPLITS
from imgcls_dist.data.seeds import derive_seed
from imgcls_dist.data.shards import ShardWriter, write_shards
from imgcls_dist.errors import JobFailed, UserError, root_cause
from imgcls_dist.storage import Location, PathLike, location

# Object-store reads overlap in threads (each is a round trip); local files are read in the task's thread:
# threads made a task reading local JPEGs slower (docs/benchmarks.md, "Ingest on Ray").
READ_THREADS_REMOTE = 8
PROGRESS_EVERY_S = 10.0
# Images per shard whose size and colour are recorded: enough for the dataset's typical image (the quick start
# picks image size and channels from it), and a fixed cost per shard whatever the shard's size.
SHAPES_PER_SHARD = 64


def _split_indices(labels: np.ndarray, fractions: tuple[float, float, float], seed: int) -> dict[str, np.ndarray]:
    idx = np.arange(len(labels))
    train_f, val_f, test_f = fractions
    counts = Counter(labels.tolist())
    # Stratify only when every class can appear in every split; tiny folders fall back to random.
    strat = labels if min(counts.values()) >= 3 else None
    rest_f = val_f + test_f
    if rest_f == 0:
        return {"train": idx, "val": idx[:0], "test": idx[:0]}
    train_idx, rest = train_test_split(idx, test_size=rest_f, random_state=seed, stratify=strat)
    if val_f == 0 or test_f == 0:
        return {"train": train_idx, "val": rest if val_f else rest[:0], "test": rest if test_f else rest[:0]}
    val_idx, test_idx = train_test_split(
        rest, test_size=test_f / rest_f, random_state=seed, stratify=None if strat is None else labels[rest]
    )
    return {"train": train_idx, "val": val_idx, "test": test_idx}


def _check_args(fractions: tuple[float, ...], rows_per_shard: int) -> None:
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6 or fractions[0] <= 0:
        raise UserError(f"--splits {fractions}: need three non-negative fractions train,val,test summing to 1 (train > 0)")
    if rows_per_shard < 1:
        raise UserError("--rows-per-shard must be >= 1")


def _check_out(out: Location, overwrite: bool) -> None:
    out.check_writable()
    if (out / DATASET_FILE).exists() and not overwrite:
        raise UserError(f"{out}: already holds a dataset (use --overwrite to replace it)")


def _clear_out(out: Location) -> None:
    (out / DATASET_FILE).delete()  # first: from here on OUT is no dataset until this run finishes
    for s in SPLITS:
        (out / s).delete()


# ---------------------------------------------------------------- one shard (runs as a Ray task)


def write_image_shard(src_uri: str, items: list[tuple[str, int]], dest_uri: str) -> dict[str, Any]:
    """Read `items` ((path relative to src, label)), keep the ones that decode, write them to `dest_uri`
    (row group by row group). Returns counts, skipped files with reasons, and who did the work."""
    src = location(src_uri)
    t0 = time.perf_counter()
    skipped: list[str] = []
    classes: Counter = Counter()
    nbytes = 0
    shapes: list[tuple[int, int, bool]] = []  # (height, width, gray) of the first SHAPES_PER_SHARD images

    def read(item: tuple[str, int]) -> tuple[str, int, bytes | None, str | None]:
        try:
            if src.is_local:
                with open(f"{src.path}/{item[0]}", "rb") as f:
                    return item[0], item[1], f.read(), None
            return item[0], item[1], (src / item[0]).read_bytes(), None
        except OSError as e:
            return item[0], item[1], None, f"cannot read file: {e.strerror or e}"
        except UserError as e:
            return item[0], item[1], None, str(e).split(": ", 1)[-1]

    threads = 1 if src.is_local else READ_THREADS_REMOTE
    with ShardWriter(dest_uri) as writer, ThreadPoolExecutor(threads) as pool:
        for start in range(0, len(items), threads * 4):  # bounded read-ahead
            for rel, label, data, err in pool.map(read, items[start:start + threads * 4]):
                if err is None:
                    array, err = decode_image(data)  # a training set never carries rows that can't be used
                    if err is None and len(shapes) < SHAPES_PER_SHARD:
                        shapes.append((*array.shape[:2], _is_gray(array)))
                if err is not None:
                    skipped.append(f"{src / rel}: {err}")
                    continue
                writer.add(rel, data, label)
                nbytes += len(data)
                classes[label] += 1
    return {"file": dest_uri, "rows": writer.rows, "bytes": nbytes, "class_counts": dict(classes),
            "skipped": skipped, "listed": len(items), "shapes": shapes, "pid": os.getpid(), "node": _node_id(),
            "seconds": time.perf_counter() - t0}


def _is_gray(rgb: np.ndarray) -> bool:
    """Whether an RGB array has no colour (the decoder returns gray files as three equal channels)."""
    return bool((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all())


def image_stats(shapes: Sequence[tuple[int, int, bool]]) -> dict[str, Any]:
    """dataset.json "images": the median height and width of the sampled images and whether they are all gray."""
    if not shapes:
        return {}
    h, w, gray = (np.array(c) for c in zip(*shapes))
    return {"median_height": int(np.median(h)), "median_width": int(np.median(w)), "gray": bool(gray.all()),
            "sampled": len(shapes)}


def _node_id() -> str | None:
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    except Exception:  # noqa: BLE001 - provenance only
        return None


# ---------------------------------------------------------------- the job


def _plan_shards(listing: Listing, parts: dict[str, np.ndarray], out: Location, rows_per_shard: int,
                 seed: int) -> list[tuple[str, list[tuple[str, int]], str]]:
    """(split, items, destination URI) per shard; each split's rows in an order seeded by (seed, split).
    Not path order: a tree's paths are grouped by class, so every row group would hold one class or two, and
    a training batch (or a worker's share of a small split, or the BatchNorm statistics it keeps) would see
    a few classes at a time."""
    plan = []
    for k_split, split in enumerate(SPLITS):
        by_path = sorted(parts[split].tolist(), key=lambda i: listing.paths[i])  # independent of listing order
        order = np.random.default_rng(derive_seed(seed, k_split, 0x1A6)).permutation(len(by_path))
        chosen = [by_path[i] for i in order]
        for k, start in enumerate(range(0, len(chosen), rows_per_shard)):
            items = [(listing.paths[i], listing.labels[i]) for i in chosen[start:start + rows_per_shard]]
            plan.append((split, items, (out / split / f"part-{k:05d}.parquet").uri))
    return plan


def _progress_line(done: int, total: int, files: int, all_files: int, skipped: int, t0: float) -> str:
    el = time.perf_counter() - t0
    rate = files / el if el > 0 else 0.0
    eta = f"{(all_files - files) / rate:,.0f}s" if rate > 0 else "unknown until a shard is done"
    return (f"ingest: {done}/{total} shards, {files:,}/{all_files:,} files ({skipped} skipped), "
            f"{rate:,.0f} files/s, ETA {eta}")


def _run_shard_tasks(src: Location, plan: list[tuple[str, list, str]], verbose: bool) -> list[dict[str, Any]]:
    import ray

    from imgcls_dist.ray_utils import ensure_ray

    ensure_ray()
    # Retried on a lost worker or node and on errors (a flaky store): a retry rewrites the same file.
    task = ray.remote(write_image_shard).options(num_cpus=1, max_retries=3, retry_exceptions=True)
    pending = {task.remote(src.uri, items, dest): i for i, (_, items, dest) in enumerate(plan)}
    results: list[dict[str, Any] | None] = [None] * len(plan)
    all_files = sum(len(items) for _, items, _ in plan)
    files = skipped = 0
    t0 = last = time.perf_counter()
    refs = list(pending)
    try:
        while refs:
            ready, refs = ray.wait(refs, num_returns=len(refs), timeout=1.0)
            for ref in ready:
                r = ray.get(ref)
                results[pending[ref]] = r
                files += r["listed"]
                skipped += len(r["skipped"])
            now = time.perf_counter()
            if verbose and (now - last >= PROGRESS_EVERY_S or not refs):
                print(_progress_line(len(plan) - len(refs), len(plan), files, all_files, skipped, t0), flush=True)
                last = now
    except Exception as e:  # noqa: BLE001 - a task failed after its retries: one line, no dataset.json written
        for ref in refs:
            ray.cancel(ref)
        raise JobFailed(f"ingest failed: {root_cause(e)}") from None
    return [r for r in results if r is not None]


def _plan_tree(src: Location, out: Location, fractions, rows_per_shard: int, seed: int,
               classes: Sequence[str] | None = None):
    """Listing, split and shard plan: everything decided before a byte is read or written."""
    listing = list_image_tree(src)
    if classes:
        listing = keep_classes(listing, classes, str(src))
    if listing.splits is not None:
        sp = np.asarray(listing.splits)
        parts = {s: np.flatnonzero(sp == s) for s in SPLITS}
    else:
        parts = _split_indices(np.asarray(listing.labels, dtype=np.int64), fractions, seed)
    return listing, _plan_shards(listing, parts, out, rows_per_shard, seed)


def _ingest_tree(src: Location, out: Location, listing: Listing, plan: list, fractions,
                 verbose: bool) -> dict[str, Any]:
    say = print if verbose else (lambda *a, **k: None)
    layout = "pre-split tree, splits kept" if listing.splits is not None else f"split {fractions}"
    say(f"ingest {src}: {len(listing):,} images in {len(listing.classes)} classes ({layout}) -> {out}, "
        f"{len(plan)} shards on Ray", flush=True)
    for note in listing.notes:
        say(f"ingest: note: {note}", flush=True)
    results = _run_shard_tasks(src, plan, verbose)
    for split in SPLITS:  # an empty split still gets one (empty) shard so the layout is complete
        if not any(p[0] == split for p in plan):
            write_shards([], out / split)
    counts, class_counts, skipped = Counter(), {s: Counter() for s in SPLITS}, []
    for (split, _, _), r in zip(plan, results):
        counts[split] += r["rows"]
        class_counts[split].update({int(k): v for k, v in r["class_counts"].items()})
        skipped.extend(r["skipped"])
    if not sum(counts.values()):
        raise UserError(f"{src}: none of the {len(listing)} listed images decodes")
    return {
        "classes": listing.classes,
        "counts": {s: counts[s] for s in SPLITS},
        "source": src.uri,
        "layout": "pre-split" if listing.splits is not None else "split by ingest",
        "class_counts": {s: {listing.classes[k]: v for k, v in sorted(class_counts[s].items())} for s in SPLITS},
        "skipped": sorted(skipped),
        "images": image_stats([sh for r in results for sh in r["shapes"]]),
        "notes": listing.notes,
        "ingest": {"shards": len(plan), "worker_processes": len({(r["node"], r["pid"]) for r in results}),
                   "nodes": len({r["node"] for r in results}), "bytes": sum(r["bytes"] for r in results)},
    }


def _ingest_builtin(name: str, out: Location, image_size: int, fractions, rows_per_shard: int,
                    seed: int, wanted: Sequence[str] | None = None) -> dict[str, Any]:
    """Built-in datasets are tiny and generated in memory: written by this process, no Ray needed."""
    rows_iter, _, classes, extra = builtin_rows(name, image_size)
    rows = list(rows_iter)
    if wanted:
        classes, new = relabel_classes(classes, wanted, f"builtin:{name}")
        rows = [(rid, img, new[lbl]) for rid, img, lbl in rows if lbl in new]
    labels = np.array([r[2] for r in rows], dtype=np.int64)
    parts = _split_indices(labels, fractions, seed)
    counts = {}
    for split in SPLITS:
        chosen = sorted(parts[split].tolist())
        write_shards((rows[i] for i in chosen), out / split, rows_per_shard=rows_per_shard)
        counts[split] = len(chosen)
    return {
        "classes": classes,
        "counts": counts,
        "source": f"builtin:{name}",
        "class_counts": {s: {classes[k]: v for k, v in sorted(Counter(labels[parts[s]].tolist()).items())} for s in SPLITS},
        "skipped": [],
        "images": {"median_height": image_size, "median_width": image_size, "gray": extra["gray"], "sampled": len(rows)},
        **{k: v for k, v in extra.items() if k not in ("source", "gray")},
    }


def ingest(
    src: str,
    out: PathLike,
    *,
    image_size: int = 32,
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
    rows_per_shard: int = 500,
    seed: int = 0,
    overwrite: bool = False,
    verbose: bool = True,
    classes: Sequence[str] | None = None,
) -> dict:
    """`classes`: ingest only these classes (by name), labelled 0..k-1 in the dataset's class order."""
    _check_args(fractions, rows_per_shard)
    out_loc = location(out)
    builtin = src.startswith("builtin:")
    if builtin:  # an unknown name or class fails here, before the output is cleared
        relabel_classes(builtin_classes(src.split(":", 1)[1]), classes or [], src)
    if not builtin:  # every check, the listing and the plan before anything is written
        src_loc = location(src).check_readable("source directory")
        if not src_loc.is_dir():
            raise UserError(f"{src}: not a directory (expected an image tree SRC/<class>/<image>, "
                            "SRC/<split>/<class>/<image>, or builtin:digits)")
        listing, plan = _plan_tree(src_loc, out_loc, fractions, rows_per_shard, seed, classes)
    _check_out(out_loc, overwrite)
    _clear_out(out_loc)
    t0 = time.perf_counter()
    if builtin:
        meta = _ingest_builtin(src.split(":", 1)[1], out_loc, image_size, fractions, rows_per_shard, seed, classes)
    else:
        meta = _ingest_tree(src_loc, out_loc, listing, plan, fractions, verbose)
    meta["seed"] = seed
    meta["wall_s"] = round(time.perf_counter() - t0, 2)
    (out_loc / DATASET_FILE).write_text(json.dumps(meta, indent=2))
    return meta


def print_summary(meta: dict, out: str) -> None:
    c = meta["counts"]
    print(f"ingested {sum(c.values())} images, {len(meta['classes'])} classes -> {out} "
          f"(train {c['train']}, val {c['val']}, test {c['test']})")
    for s in meta["skipped"][:10]:
        print(f"  skipped {s}", file=sys.stderr)
    if len(meta["skipped"]) > 10:
        print(f"  ... and {len(meta['skipped']) - 10} more skipped (all listed in {DATASET_FILE})", file=sys.stderr)
