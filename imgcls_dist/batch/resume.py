"""Resuming an interrupted batch-inference run: adopt what it durably wrote, predict only the rest.

`fingerprint` identifies the job (written to `_resume.json` in the staging directory before any prediction);
`take_over`, with the lease held, adopts the parts of an unfinished run of the same job, refuses another job's
or starts a new staging; `check_exact` lets nothing be published unless every input row is in exactly one part.
Resuming is the default, `--fresh` discards. Design (the fingerprint, why not Ray Data's checkpointing):
docs/design.md, "Resuming a batch job".
"""

from __future__ import annotations

import bisect
import hashlib
import json
import time
from dataclasses import dataclass
from typing import Any

from imgcls_dist.errors import JobFailed, UserError
from imgcls_dist.batch import parts as P
from imgcls_dist.batch.job import InferJob
from imgcls_dist.batch.publish import STAGING_PREFIX, staging_dirs
from imgcls_dist.storage import Location, location

FINGERPRINT = "_resume.json"
FORMAT = 1  # bump when parts written by an older version can no longer be adopted
_HASH_CHUNK = 8 << 20


# ---------------------------------------------------------------- fingerprint


def _sha256(uri: str) -> str:
    loc = location(uri)
    h = hashlib.sha256()
    try:
        with loc.fs.open_input_stream(loc.path) as f:
            while chunk := f.read(_HASH_CHUNK):
                h.update(chunk)
    except OSError as e:
        raise loc.error(e) from None
    return h.hexdigest()


def fingerprint(job: InferJob, run_id: str, decode: str, precision: str, backend: str,
                calibration: str | None = None) -> dict[str, Any]:
    """What makes a run the same job as the one that wrote a staging: `decode`, `precision` and `backend` as
    resolved for the actors' device ("cpu"/"device"; "fp32"/"bf16"/"fp16"/"int8"; "torch"/"onnxruntime"), and
    the dataset an int8 run was calibrated on (its URI)."""
    return {
        "format": FORMAT,
        "run_id": run_id,  # the run that started this staging (informational)
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "inputs": [{"uri": f.uri, "bytes": f.bytes, "mtime_ns": f.mtime_ns, "rows": f.rows} for f in job.layout],
        "models": [{"path": m["path"], "sha256": _sha256(m["path"])} for m in job.members],
        "tta_views": job.views,
        "weights": job.norm_weights,
        "temperatures": job.temperatures,
        "combine": job.combine,
        "classes": job.classes,
        "label_passthrough": job.with_label,
        "decode": decode,  # CPU (reduced-size) and device decodes give slightly different pixels
        "precision": precision,  # bf16 moves probabilities by up to ~0.01 from fp32's
        "backend": backend,  # onnxruntime's fp32 differs from torch's in the last bits
        "calibration": calibration,  # other calibration images, other int8 ranges
    }


def _inputs_diff(old: list[dict], new: list[dict]) -> str | None:
    o, n = {f["uri"]: f for f in old}, {f["uri"]: f for f in new}
    bits = []
    added, removed = [u for u in n if u not in o], [u for u in o if u not in n]
    if added:
        bits.append(f"{len(added)} added, e.g. {added[0]}")
    if removed:
        bits.append(f"{len(removed)} gone, e.g. {removed[0]}")
    for u in (u for u in n if u in o and o[u] != n[u]):
        key = next((k for k in ("rows", "bytes", "mtime_ns") if o[u].get(k) != n[u].get(k)), None)
        bits.append(f"{u} changed ({key} {o[u].get(key)} -> {n[u].get(key)})" if key else f"{u} changed")
        break
    return f"input files ({'; '.join(bits)})" if bits else None


def _models_diff(old: list[dict], new: list[dict]) -> str | None:
    if len(old) != len(new):
        return f"models ({len(old)} members -> {len(new)})"
    for i, (a, b) in enumerate(zip(old, new), 1):
        if a["sha256"] != b["sha256"]:
            return f"models (member {i}: {a['path']} sha256 {a['sha256'][:12]} -> {b['path']} {b['sha256'][:12]})"
    return None


def _fmt(v: Any) -> str:
    return ",".join(map(str, v)) if isinstance(v, list) else str(v)


_PLAIN = {"tta_views": "TTA views", "weights": "weights", "temperatures": "temperatures", "combine": "combine",
          "classes": "classes", "label_passthrough": "label passthrough", "decode": "decode",
          "precision": "precision", "backend": "backend", "calibration": "calibration", "format": "staging format"}
# Stagings written before a key existed ran what it now says by default.
_BEFORE = {"backend": "torch", "calibration": None}


def difference(old: dict[str, Any], new: dict[str, Any]) -> str | None:
    """What makes two fingerprints different jobs, in a few words; None when they are the same job."""
    diffs = [_inputs_diff(old.get("inputs", []), new["inputs"]), _models_diff(old.get("models", []), new["models"])]
    diffs += [f"{label} ({_fmt(old.get(k, _BEFORE.get(k)))} -> {_fmt(new[k])})"
              for k, label in _PLAIN.items()
              if old.get(k, _BEFORE.get(k)) != new[k]]
    diffs = [d for d in diffs if d]
    return ", ".join(diffs) if diffs else None


def read_fingerprint(staging: Location) -> dict[str, Any] | None:
    f = staging / FINGERPRINT
    try:
        doc = f.read_json() if f.is_file() else None
    except UserError:
        return None  # vanished or torn: not a staging we can trust
    ours = isinstance(doc, dict) and _entries(doc.get("inputs"), "uri") \
        and _entries(doc.get("models"), "path", "sha256")
    return doc if ours else None


def _entries(value: Any, *keys: str) -> bool:
    """Whether `value` is a list of objects with a string at each of `keys`: what `difference` reads."""
    return isinstance(value, list) and all(isinstance(e, dict) and all(isinstance(e.get(k), str) for k in keys)
                                           for e in value)


# ---------------------------------------------------------------- coverage


class Coverage:
    """Which input rows a set of parts holds: per input file, sorted disjoint (start, end) intervals."""

    def __init__(self, layout: list[P.FileLayout]):
        self.rows = [fl.rows for fl in layout]
        self.ivs: list[list[tuple[int, int]]] = [[] for _ in layout]

    def _free(self, f: int, s: int, e: int) -> bool:
        if not (0 <= f < len(self.rows) and 0 <= s < e <= self.rows[f]):
            return False
        ivs = self.ivs[f]
        k = bisect.bisect_right(ivs, (s, e))
        return (k == 0 or ivs[k - 1][1] <= s) and (k == len(ivs) or ivs[k][0] >= e)

    def add(self, part: P.Part) -> bool:
        """Take `part` if every row it holds is in the input and held by no part taken before."""
        ranges = sorted(part.ranges)
        own_overlap = any(a[0] == b[0] and a[2] > b[1] for a, b in zip(ranges, ranges[1:]))
        if own_overlap or not all(self._free(*r) for r in ranges):
            return False
        for f, s, e in ranges:
            bisect.insort(self.ivs[f], (s, e))
        return True

    def gaps(self) -> dict[int, list[tuple[int, int]]]:
        out = {}
        for f, (n, ivs) in enumerate(zip(self.rows, self.ivs)):
            missing, at = [], 0
            for s, e in ivs:
                if s > at:
                    missing.append((at, s))
                at = e
            if at < n:
                missing.append((at, n))
            if missing:
                out[f] = missing
        return out


def check_exact(parts: list[P.Part], layout: list[P.FileLayout], staging: Location) -> None:
    """Before publishing: every input row in exactly one part, or JobFailed and nothing published."""
    cov = Coverage(layout)
    clash = next((p for p in parts if not cov.add(p)), None)
    rows_out, rows_in = sum(p.rows for p in parts), sum(fl.rows for fl in layout)
    kept = f"nothing published (staged output kept in {staging}; a rerun predicts what is missing)"
    if clash is not None:
        raise JobFailed(f"rows out {rows_out} != rows in {rows_in}: {clash.loc.name} holds rows another part "
                        f"holds; {kept}")
    gaps = cov.gaps()
    if gaps:
        f, [(s, e), *_] = next(iter(gaps.items()))
        raise JobFailed(f"rows out {rows_out} != rows in {rows_in} (rows {s}-{e - 1} of {layout[f].uri} never "
                        f"written); {kept}")


# ---------------------------------------------------------------- take over OUT's staging


@dataclass
class Takeover:
    staging: Location
    adopted: list[P.Part]
    resumed_from: str | None  # run id that started the adopted staging
    todo: dict[int, list[tuple[int, int]]]  # input file index -> row ranges still to predict

    @property
    def rows_adopted(self) -> int:
        return sum(p.rows for p in self.adopted)

    @property
    def rows_todo(self) -> int:
        return sum(e - s for ranges in self.todo.values() for s, e in ranges)


def _refusal(out: Location, staging: Location, found: list[Location], diff: str) -> UserError:
    rows = sum(p.rows for p in P.read_parts(found))
    return UserError(f"{out}: holds an unfinished infer run ({rows} rows in {len(found)} parts, {staging.name}) "
                     f"of another job: {diff}; rerun with --fresh to discard it and start over (or delete "
                     f"{staging})")


def take_over(out: Location, fp: dict[str, Any], layout: list[P.FileLayout], run_id: str, fresh: bool) -> Takeover:
    """With the lease held: resume the unfinished run of this job, refuse another job's, or start afresh."""
    candidates = []  # (staging, its part files) of this job
    for d in staging_dirs(out):
        found = P.staged_parts(d)
        old = read_fingerprint(d)
        if fresh or not found or old is None:
            d.delete()
            continue
        diff = difference(old, fp)
        if diff:
            raise _refusal(out, d, found, diff)
        candidates.append((d, found))
    candidates.sort(key=lambda c: len(c[1]), reverse=True)
    for d, _ in candidates[1:]:  # only one lease holder writes at a time, so this is rare: keep the largest
        d.delete()
    if not candidates:
        staging = out / f"{STAGING_PREFIX}{run_id}"
        (staging / FINGERPRINT).write_text(json.dumps(fp, indent=1))
        return Takeover(staging, [], None, {i: [(0, fl.rows)] for i, fl in enumerate(layout) if fl.rows})
    staging, found = candidates[0]
    cov = Coverage(layout)
    adopted = [p for p in sorted(P.read_parts(found), key=lambda p: p.loc.name) if cov.add(p)]
    return Takeover(staging, adopted, staging.name[len(STAGING_PREFIX):], cov.gaps())
