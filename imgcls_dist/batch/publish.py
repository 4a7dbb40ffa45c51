"""The predictions directory protocol: one writer at a time, staged output, the manifest as commit point.

Steps: 1 lease (`Lease`, `exclusive`: `OUT/.leases/<run_id>.json`, kept alive by a heartbeat), 2 staging
(`OUT/.staging-<run_id>/`), 3 count (`footer_counts`), 4 publish (`publish`), 5 commit (`commit`:
`_manifest.json`, last). Readers go through the manifest: `read_manifest`, `prediction_files`. Design, and why
it holds on object stores: docs/design.md, "Publishing predictions"; the contract: docs/design.md, "Predictions".
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from contextlib import contextmanager
from typing import Any, Iterator

import pyarrow.parquet as pq

from imgcls_dist.errors import JobFailed, UserError
from imgcls_dist.storage import Location, PathLike, location

MANIFEST = "_manifest.json"
LEASES = ".leases"
STAGING_PREFIX = ".staging-"
ERROR = "error"
LEASE_HEARTBEAT_S = float(os.environ.get("IMGCLS_INFER_LEASE_HEARTBEAT_S", "10"))
LEASE_TTL_S = float(os.environ.get("IMGCLS_INFER_LEASE_TTL_S", "60"))


# ---------------------------------------------------------------- lease


def _pid_alive(pid: int) -> bool:
    if pid <= 0:  # a process group, not a process (and os.kill(-1, 0) would probe every process)
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # OverflowError: a number beyond any pid
        return False
    except PermissionError:
        return True
    return True


class Lease:
    """This run's claim on OUT (docs/design.md, "Publishing predictions", step 1); `with lease:` holds it with a
    heartbeat."""

    def __init__(self, out: Location, run_id: str):
        self.out, self.run_id = out, run_id
        self.file = out / LEASES / f"{run_id}.json"
        self.body = json.dumps({"run_id": run_id, "host": socket.gethostname(), "pid": os.getpid(),
                                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}).encode()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _stale(self, other: Location, now_ns: int) -> tuple[bool, float]:
        mtime = other.mtime_ns()
        if mtime is None:
            return True, 0.0  # deleted meanwhile
        age = max(0.0, (now_ns - mtime) / 1e9)
        try:
            doc = other.read_json()
        except UserError:
            return True, age  # torn or vanished: not a live run's
        if not isinstance(doc, dict):
            return True, age
        if doc.get("host") == socket.gethostname() and isinstance(doc.get("pid"), int) and not _pid_alive(doc["pid"]):
            return True, age
        return age > LEASE_TTL_S, age

    def acquire(self) -> None:
        self.file.write_bytes(self.body)
        now = self.file.mtime_ns() or time.time_ns()  # the store's clock, not ours
        for other in (self.out / LEASES).files(".json", recursive=False):
            if other == self.file:
                continue
            stale, age = self._stale(other, now)
            if stale:
                other.delete()
                continue
            self.file.delete()
            raise UserError(f"{self.out}: another infer run ({other.stem}, last heartbeat {age:.0f}s ago) is "
                            f"writing here; wait for it to finish, or if it died, rerun after "
                            f"{max(1.0, LEASE_TTL_S - age):.0f}s (when its lease expires)")
        self._thread = threading.Thread(target=self._beat, name="infer-lease", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(LEASE_HEARTBEAT_S):
            try:
                self.file.write_bytes(self.body)
            except Exception:  # noqa: BLE001 - a missed beat is survivable; check() catches a lost lease
                pass

    def check(self) -> None:
        """Before publishing: the lease must still be ours (another run may have judged us dead)."""
        if not self.file.is_file():
            raise JobFailed(f"{self.out}: this run's lease {self.file.name} was taken over (the run was frozen for "
                            f"more than {LEASE_TTL_S:.0f}s?); nothing published")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=LEASE_HEARTBEAT_S + 5)
        self.file.delete()

    def __enter__(self) -> Lease:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def staging_dirs(out: Location) -> list[Location]:
    """Staging dirs in OUT: with our lease held, none of them belongs to a live run."""
    return [d for d in out.iterdir() if d.name.startswith(STAGING_PREFIX)]


# ---------------------------------------------------------------- count, publish, commit


def footer_counts(pf: pq.ParquetFile) -> tuple[int, int]:
    """(rows, error rows) of a predictions file: null counts of `error` come from column statistics, so
    counting never reads the data pages."""
    md = pf.metadata
    col = md.schema.names.index(ERROR)
    nulls = 0
    for rg in range(md.num_row_groups):
        stats = md.row_group(rg).column(col).statistics
        if stats is None or not stats.has_null_count:
            nulls = pf.read(columns=[ERROR]).column(ERROR).null_count
            break
        nulls += stats.null_count
    return md.num_rows, md.num_rows - nulls


def publish(out: Location, staged: list[tuple[Location, int, int]], run_id: str) -> list[dict[str, Any]]:
    """Step 4: the staged files become OUT's top-level files; returns their manifest entries."""
    (out / MANIFEST).delete()  # from here until the commit, OUT claims nothing
    for old in out.files(".parquet", recursive=False):
        old.delete()
    files = []
    for i, (src, rows, errors) in enumerate(staged):
        dst = src.move_to(out / f"part-{run_id}-{i:05d}.parquet")
        files.append({"name": dst.name, "rows": rows, "error_rows": errors, "bytes": dst.size()})
    return files


def commit(out: Location, manifest: dict[str, Any]) -> None:
    """Step 5: the manifest, last and in one atomic write."""
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))


# ---------------------------------------------------------------- readers


def read_manifest(out: PathLike) -> dict[str, Any]:
    """The manifest of a completed run; UserError when OUT is missing, incomplete or not predictions."""
    loc = location(out)
    p = loc / MANIFEST
    if not p.is_file():
        if not loc.is_dir():
            loc.check_readable("predictions directory")
        raise UserError(f"{loc}: no {MANIFEST} (not a predictions directory, or its infer run did not finish)")
    doc = p.read_json()
    _check_manifest(p, doc)
    return doc


def _check_manifest(p: Location, doc: Any) -> None:
    """What `prediction_files` relies on: a damaged manifest is one UserError here, not a KeyError later."""
    files = doc.get("files", []) if isinstance(doc, dict) else None
    if not isinstance(files, list):
        raise UserError(f"{p}: not a predictions manifest (expected an object with a 'files' list)")
    for i, entry in enumerate(files):
        name = entry.get("name") if isinstance(entry, dict) else None
        # a file name as publish() writes it, never a path: a manifest cannot point outside its directory
        if not isinstance(name, str) or name in ("", ".", "..") or set(name) & set("/\\") \
                or not name.isprintable():
            raise UserError(f"{p}: files[{i}] must be an object whose 'name' is a file name in the directory")
        if "bytes" in entry and (type(entry["bytes"]) is not int or entry["bytes"] < 0):
            raise UserError(f"{p}: files[{i}].bytes must be a byte count (an integer >= 0)")


def prediction_files(out: PathLike) -> list[Location]:
    """The files a completed run published (from its manifest, never a directory listing)."""
    loc = location(out)
    files = []
    for entry in read_manifest(loc).get("files", []):
        f = loc / entry["name"]
        if not f.is_file():
            raise UserError(f"{loc}: manifest lists {f.name}, which is missing (rerun infer)")
        if "bytes" in entry and f.size() != entry["bytes"]:
            raise UserError(f"{loc}: {f.name} changed after the run published it (rerun infer)")
        files.append(f)
    return files


@contextmanager
def exclusive(out: Location, run_id: str) -> Iterator[Lease]:
    """Hold OUT for this run (the lease); what to do with dead runs' staging is `batch/resume.py`'s call."""
    with Lease(out, run_id) as lease:
        yield lease
