"""`python -m benchmarks fuzz`: hostile input at volume, for the decoder and for every reader of a file the
system writes.

Decode cases: `decode_image` on random bytes, and valid small files of every whitelisted format (JPEG, PNG, WebP,
BMP, GIF, TIFF) mutated by seeded byte flips, truncations, inserted and repeated chunks, and header dimension
bombs. Every case must honour the decoder's contract (an HxWxC uint8 array xor a one-line error, never an
exception), and finish in time.

Reader cases (`--target readers`): corrupted copies of `ensemble.json`, a bulk job's `_manifest.json`, a staged
part's Parquet footer, `_resume.json` and lease files, `dataset.json`, `model.pt` (hostile pickles among them) and
configs (YAML tags, `--set` overrides), each read by its reader: a result or the reader's one-line refusal, never
another exception, and never code from the file run.

The cases run in child processes, so a crash of native code (a segfault) is seen as a broken pool, not as the
benchmark dying. No fuzzing library: a seeded mutator is enough for contracts of the kind "anything in, no
exception out", and it makes every reported case reproducible from (seed, index) alone (`--seed S`;
`case(S, i, seed_files())`, `reader_case(S, i, reader_seeds(dir))`).
"""

from __future__ import annotations

import copy
import faulthandler
import functools
import io
import json
import multiprocessing
import os
import resource
import shlex
import signal
import tempfile
import time
import warnings
import zipfile
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from benchmarks.common import machine
from imgcls_dist.table import format_table

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


# ================================================================ readers: the files the system writes
#
# Each reader gets corrupted copies of a valid file written by the project's own writer: byte-level mutations
# (the decoder's `mutate`), structural ones on the parsed document (wrong types, missing and unknown keys, huge
# numbers, NaN, deep nesting), and per format: a model file's pickle mutated inside a well-formed zip, and
# hostile pickles that call os.system & co. on an unrestricted load; YAML tags, anchors and directives, and
# hostile `--set` overrides for configs. A reader's contract: its result, or its documented refusal (UserError /
# JobFailed with a one-line message; None where the reader returns None for a file that is not one of ours), and
# never code from the file run.

READERS = ("ensemble", "manifest", "part", "dataset", "model", "config", "fingerprint", "lease")
READER_CHUNK = 200
CASE_LIMIT_S = 10.0  # a reader case still running after this is stopped (SIGALRM) and counted as a hang
KILL_S = 30.0  # a worker stuck in native code (where SIGALRM cannot reach) is killed after this: a crashed chunk
ADDRESS_SPACE = 6 << 30  # per reader worker (RLIMIT_AS); importing torch and pyarrow maps ~3.6 GiB of it
MAX_ERROR_CHARS = 1000  # a refusal may quote its input, but say no more than this beside it
CLASSES = ["0", "1", "2"]
RUN_ID = "20261205-000000-fuzz"
EXECUTED = "imgcls-fuzz-executed"  # what a hostile file creates, relative to the reader's working directory

# Placeholders for what json/yaml cannot write, spliced in as text: an integer past Python's 4300-digit limit
# for int() (the parsers raise ValueError) and nesting past the recursion limit (RecursionError).
HUGE_INT, DEEP = "fuzz_huge_int", "fuzz_deep_nesting"
SPLICES = {HUGE_INT: "9" * 5000, DEEP: "[" * 50_000 + "]" * 50_000}
HOSTILE = (None, True, False, 0, -1, 1.5, 2**63, -(2**63) - 1, 1e308, float("nan"), float("inf"), float("-inf"),
           "", "x" * 10_000, "\ud800", "a\x00b", "../../outside", "s3://", "NaN", [], {}, [[]], [None, None],
           {"": None}, HUGE_INT, DEEP)


@dataclass(frozen=True)
class ReaderSeeds:
    files: dict[str, bytes]  # reader -> the valid file its cases corrupt
    published: dict[str, bytes]  # the prediction files the predictions manifest lists, by name


@dataclass(frozen=True)
class ReaderCase:
    reader: str
    mutation: str
    data: bytes
    overrides: tuple[str, ...] = ()


class _Call:
    """Pickles as the call fn(*args): what a hostile model file runs on an unrestricted torch.load."""

    def __init__(self, fn, args: tuple):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


class CaseTimeout(BaseException):
    """A reader case ran past CASE_LIMIT_S (a BaseException: the readers' own `except Exception` keep out)."""


# ---------------------------------------------------------------- seeds: the project's writers


def _model_payload_args(config: dict) -> dict[str, Any]:
    return dict(arch="lenet5", classes=CLASSES, in_channels=1, image_size=32, mean=[0.5], std=[0.25],
                config=config, metrics={"val_acc": 0.9, "val_loss": 0.3, "epoch": 4.0}, hflip=False)


def _predictions(rows: list[tuple[int, int]]) -> pa.Table:
    """Predictions of `rows` ((input file, row) positions) as the predictor actors emit them: one error row."""
    from imgcls_dist.batch.parts import POSITION_FIELDS
    from imgcls_dist.batch.stages import output_schema

    n = len(rows)
    probs = np.random.default_rng(n).dirichlet(np.ones(len(CLASSES)), n).astype(np.float32)
    ok = np.arange(n) != 1
    cols = {"id": [f"img-{f}-{r}" for f, r in rows], "pred": pa.array(probs.argmax(1).astype(np.int32), mask=~ok),
            "pred_name": pa.array([CLASSES[i] for i in probs.argmax(1)], mask=~ok),
            "confidence": pa.array(probs.max(1), mask=~ok),
            "probs": pa.array([p.tolist() if k else None for p, k in zip(probs, ok)], pa.list_(pa.float32())),
            "entropy": pa.array(-(probs * np.log(probs)).sum(1), mask=~ok), "label": [r % 3 for _, r in rows],
            "error": [None if k else "cannot identify image file" for k in ok]}
    schema = pa.schema(list(output_schema(with_label=True)) + POSITION_FIELDS)
    return pa.table({**cols, "_pos_file": [f for f, _ in rows], "_pos_row": [r for _, r in rows]}, schema=schema)


def _predictions_dir(out: Path) -> tuple[bytes, dict[str, bytes], bytes]:
    """A finished bulk job's directory, through the job's own steps (parts, publish, commit): (the manifest,
    the published files, one staged part). The manifest has the keys `publish_job` writes; its values are fixed
    so the seed is the same on every machine."""
    from imgcls_dist.batch import parts, publish
    from imgcls_dist.storage import location

    staged = []
    for rows in ([(0, r) for r in (5, 3, 4, 0, 2, 1, 7, 6)], [(1, r) for r in range(4)]):
        ranges, data = parts.encode_part(_predictions(rows))
        loc = location(out / f"{publish.STAGING_PREFIX}{RUN_ID}" / parts.part_name(RUN_ID, ranges))
        loc.write_bytes(memoryview(data))
        part = parts.read_part(loc)
        staged.append((loc, part.rows, part.error_rows))
    part_bytes = staged[0][0].read_bytes()
    files = publish.publish(location(out), staged, RUN_ID)
    manifest = {
        "run_id": RUN_ID, "created": "2026-12-05T00:00:00+0000", "complete": True,
        "input_files": ["data/digits/test/part-00000.parquet", "data/digits/test/part-00001.parquet"],
        "rows_in": 12, "rows_out": 12, "rows_predicted": 12, "rows_adopted": 0, "resumed_from": None,
        "error_rows": sum(f["error_rows"] for f in files), "label_passthrough": True, "classes": CLASSES,
        "models": [{"path": "runs/lenet5_digits/model.pt", "arch": "lenet5", "image_size": 32, "in_channels": 1,
                    "weight": 1.0, "temperature": 1.0, "metrics": {"val_acc": 0.9}}],
        "tta_views": ["identity"], "combine": "mean", "weights": [1.0], "temperatures": [1.0], "batch_size": 256,
        "decode": "cpu", "precision": "fp32", "backend": "torch", "calibration": None,
        "actors": {"actors": 1, "cpus_per_actor": 1}, "wall_s": 1.5, "images_per_s": 8.0,
        "files": [{**f, "written_by": RUN_ID} for f in files],
    }
    publish.commit(location(out), manifest)
    published = {f["name"]: (out / f["name"]).read_bytes() for f in files}
    return (out / publish.MANIFEST).read_bytes(), published, part_bytes


def _fingerprint(model: Path) -> bytes:
    """`_resume.json` as `take_over` writes it, for a job over two input files and one model (its time and
    the model's path fixed afterwards, so the seed is the same on every machine)."""
    from types import SimpleNamespace

    from imgcls_dist.batch.parts import FileLayout
    from imgcls_dist.batch.resume import fingerprint

    layout = [FileLayout(f"data/digits/test/part-0000{i}.parquet", 40_000 + i, 1_764_892_800_000_000_000,
                         (135,), (40_000 + i,)) for i in range(2)]
    job = SimpleNamespace(layout=layout, members=[{"path": str(model)}], views=["identity"], norm_weights=[1.0],
                          temperatures=[1.0], combine="mean", classes=CLASSES, with_label=True)
    fp = fingerprint(job, RUN_ID, "cpu", "fp32", "torch")
    fp["created"], fp["models"][0]["path"] = "2026-12-05T00:00:00+0000", "runs/lenet5_digits/model.pt"
    return json.dumps(fp, indent=1).encode()


def _lease() -> bytes:
    """A lease file's body as `Lease` writes it (host, pid and time fixed: the same seed on every machine)."""
    from imgcls_dist.batch.publish import Lease
    from imgcls_dist.storage import location

    body = json.loads(Lease(location("predictions"), RUN_ID).body)
    body.update(host="fuzz-host", pid=4_000_000, started="2026-12-05T00:00:00+0000")
    return json.dumps(body).encode()


def _ensemble_manifest() -> bytes:
    """ensemble.json with the keys and layout `ensemble build` writes, two members. Building one for real fits
    temperatures on validation data (seconds of work, and imports of seconds more); the reader sees the same
    document."""
    scores = {"acc": 0.95, "nll": 0.18, "ece": 0.02}
    doc = {
        "models": [{"path": f"models/{n}/model.pt", "name": n, "weight": w, "temperature": t, "val_acc": 0.93,
                    "val_nll_calibrated": 0.21} for n, w, t in (("a", 0.6, 1.3), ("b", 0.4, 0.9))],
        "combine": "weighted", "views": ["identity", "shift_left"],
        "weight_rule": "greedy forward selection with replacement on validation log-loss",
        "validation": {"split": "data/digits/val/part-00000.parquet", "rows": 270, "precision": "fp32",
                       "candidates": [{"name": "a", "path": "models/a/model.pt", "temperature": 1.3, **scores}],
                       "plain_mean": scores, "selected_no_tta": scores, "result": scores,
                       "member_steps": [{"step": 1, "picked": "a", "nll": 0.2, "acc": 0.95}],
                       "view_steps": [], "candidate_views": ["identity", "shift_left", "shift_right"]},
    }
    return (json.dumps(doc, indent=2) + "\n").encode()


def reader_seeds(workdir: Path) -> ReaderSeeds:
    """One valid file per reader, written under `workdir` by the project's writers: `save_model_file` (LeNet-5,
    seeded), `write_config` (the shipped lenet5_digits config, resolved), `ingest` (built-in digits, 3 classes;
    its wall time fixed), the bulk job's parts/publish/commit, `fingerprint`, `Lease`."""
    import torch

    from imgcls_dist.config import SHIPPED_CONFIGS, load_config, write_config
    from imgcls_dist.data.ingest import ingest
    from imgcls_dist.models.checkpoint import save_model_file
    from imgcls_dist.models.registry import get_model

    cfg = load_config(SHIPPED_CONFIGS / "lenet5_digits.yaml")
    torch.manual_seed(0)
    model = save_model_file(workdir / "model.pt", model=get_model("lenet5", len(CLASSES), in_channels=1),
                            **_model_payload_args(cfg.to_dict()))
    write_config(cfg, workdir / "config.yaml")
    meta = ingest("builtin:digits", workdir / "digits", classes=CLASSES, verbose=False)
    meta["wall_s"] = 0.5
    manifest, published, part = _predictions_dir(workdir / "predictions")
    files = {"ensemble": _ensemble_manifest(), "manifest": manifest, "part": part,
             "dataset": json.dumps(meta, indent=2).encode(), "model": model.read_bytes(),
             "config": (workdir / "config.yaml").read_bytes(), "fingerprint": _fingerprint(Path(model.path)),
             "lease": _lease()}
    return ReaderSeeds(files, published)


# ---------------------------------------------------------------- structural mutations


def _nodes(doc: Any, path: tuple = ()) -> Iterator[tuple]:
    """Every path into a JSON-like tree (tensors and other objects are leaves)."""
    yield path
    children = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else ()
    for k, v in children:
        yield from _nodes(v, path + (k,))


def edit_tree(doc: Any, rng: np.random.Generator, hostile: Sequence[Any] = HOSTILE) -> Any:
    """A copy of `doc` with one node replaced by a hostile value, deleted, wrapped one level deeper, or given an
    unknown key (or element); the root itself may be replaced."""
    doc = copy.deepcopy(doc)
    value = copy.deepcopy(hostile[int(rng.integers(len(hostile)))])  # a later edit must not change the original
    paths = list(_nodes(doc))[1:]
    if not paths or rng.integers(20) == 0:
        return value
    path = paths[int(rng.integers(len(paths)))]
    parent = functools.reduce(lambda node, k: node[k], path[:-1], doc)
    key, op = path[-1], int(rng.integers(4))
    if op == 0:
        parent[key] = value
    elif op == 1:
        del parent[key]
    elif op == 2:
        parent[key] = [parent[key]] if rng.integers(2) else {"value": parent[key]}
    else:
        node = parent[key] if isinstance(parent[key], (dict, list)) else parent
        if isinstance(node, dict):
            node[f"unknown_{int(rng.integers(100))}"] = value
        else:
            node.append(value)
    return doc


def _splice(text: str, quoted: bool) -> str:
    for placeholder, raw in SPLICES.items():
        text = text.replace(json.dumps(placeholder) if quoted else placeholder, raw)
    return text


def _tree_json(seed: bytes, rng: np.random.Generator) -> bytes:
    doc = json.loads(seed)
    for _ in range(int(rng.integers(1, 4))):
        doc = edit_tree(doc, rng)
    return _splice(json.dumps(doc, indent=2), quoted=True).encode()


_ASCII = bytes(b & 0x7F for b in range(256))


def _byte_mutations(seed: bytes, rng: np.random.Generator, ascii_only: bool = False) -> bytes:
    """1-3 of the decoder campaign's mutations; `ascii_only` keeps the bytes ASCII, so that a text file's damage
    reaches its parser (else most flips stop at the UTF-8 decode)."""
    data = seed
    for _ in range(int(rng.integers(1, 4))):
        data = mutate(data, rng) or data[:1]
    return data.translate(_ASCII) if ascii_only else data


def _json_case(seed: bytes, rng: np.random.Generator) -> tuple[str, bytes]:
    kind = ("bytes", "text", "tree", "tree", "random")[int(rng.integers(5))]
    if kind == "random":
        return kind, rng.integers(0, 256, int(rng.integers(0, 512)), dtype=np.uint8).tobytes()
    if kind == "tree":
        return kind, _tree_json(seed, rng)
    return kind, _byte_mutations(seed, rng, ascii_only=kind == "text")


# ---------------------------------------------------------------- per format: Parquet footers


def _with_ranges(part: bytes, ranges: bytes) -> bytes:
    """The part rewritten with another ranges entry in its footer (everything else as written)."""
    from imgcls_dist.batch.parts import RANGES_KEY

    table = pq.read_table(pa.BufferReader(part))
    sink = pa.BufferOutputStream()
    pq.write_table(table.replace_schema_metadata({**table.schema.metadata, RANGES_KEY: ranges}), sink)
    return sink.getvalue().to_pybytes()


def _part_case(seed: bytes, rng: np.random.Generator) -> tuple[str, bytes]:
    from imgcls_dist.batch.parts import RANGES_KEY

    kind = ("bytes", "footer", "ranges")[int(rng.integers(3))]
    if kind == "ranges":  # a well-formed file whose footer says something else about its rows
        raw = pq.ParquetFile(pa.BufferReader(seed)).schema_arrow.metadata[RANGES_KEY]
        return kind, _with_ranges(seed, _tree_json(raw, rng))
    if kind == "bytes":
        return kind, _byte_mutations(seed, rng)
    footer = int.from_bytes(seed[-8:-4], "little") + 8  # the byte mutations within the footer only: thrift + 8
    return kind, seed[:-footer] + _byte_mutations(seed[-footer:], rng)


# ---------------------------------------------------------------- per format: model files


def _hostile_calls(marker: str) -> list[tuple[Any, tuple]]:
    """Calls a hostile pickle makes on an unrestricted load; each creates `marker` if it runs."""
    import builtins
    import subprocess

    code = f"open({marker!r}, 'w').close()"
    return [(os.system, (f"touch {shlex.quote(marker)}",)), (builtins.exec, (code,)), (builtins.eval, (code,)),
            (subprocess.call, (["touch", marker],)), (builtins.open, (marker, "w")), (os.mkdir, (marker,))]


def malicious_model(marker: str, how: int, where: int = 0, legacy: bool = False) -> bytes:
    """A model file (every required key present) that runs call `how` of `_hostile_calls` when unpickled
    without weights_only: as the whole payload (where 0), its arch (1), its config (2) or one of its weights
    (3); in torch's zip format or its legacy one."""
    import torch

    payload: Any = {"state_dict": {"w": torch.zeros(2)}, "num_classes": 3, **_model_payload_args({})}
    call = _Call(*_hostile_calls(marker)[how])
    if where == 0:
        payload = call
    else:
        target = (None, ("arch",), ("config",), ("state_dict", "w"))[where]
        functools.reduce(lambda node, k: node[k], target[:-1], payload)[target[-1]] = call
    buf = io.BytesIO()
    torch.save(payload, buf, _use_new_zipfile_serialization=not legacy)
    return buf.getvalue()


def _rezip(data: bytes, suffix: str, fn: Callable[[bytes], bytes]) -> bytes:
    """The zip with fn applied to its member ending in `suffix`, every member rewritten well-formed (CRCs right),
    so the mutation reaches the reader behind the zip layer."""
    src, out = zipfile.ZipFile(io.BytesIO(data)), io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            body = src.read(info)
            dst.writestr(info.filename, fn(body) if info.filename.endswith(suffix) else body)
    return out.getvalue()


def _tensor_hostiles() -> tuple[Any, ...]:
    import torch

    # a pickle holds any int and any nesting (its depth bounded by torch.save's own recursion here)
    return HOSTILE[:-2] + (10**5000, functools.reduce(lambda x, _: [x], range(200), 0), torch.zeros(0),
                           torch.ones(3, 3, dtype=torch.int64), torch.full((2,), float("nan")),
                           torch.zeros(1, 1, 1, 1, 1), torch.zeros(2, dtype=torch.complex64),
                           torch.zeros(4).to_sparse())


def _saved(payload: Any) -> bytes:
    import torch

    buf = io.BytesIO()
    torch.save(payload, buf)
    return buf.getvalue()


def _model_case(seed: bytes, rng: np.random.Generator, marker: str) -> tuple[str, bytes]:
    import torch

    kind = ("bytes", "pickle", "payload", "hostile")[int(rng.integers(4))]
    n = int(rng.integers(1, 4))
    if kind == "hostile":
        data = malicious_model(marker, int(rng.integers(6)), int(rng.integers(4)), legacy=bool(rng.integers(2)))
        return kind, mutate(data, rng) if rng.integers(4) == 0 else data  # damaged too, now and then
    if kind == "payload":
        payload = torch.load(io.BytesIO(seed), weights_only=True)
        for _ in range(n):
            payload = edit_tree(payload, rng, _tensor_hostiles())
        return kind, _saved(payload)
    if kind == "pickle":
        return kind, _rezip(seed, "data.pkl", lambda pkl: _byte_mutations(pkl, rng))
    return kind, _byte_mutations(seed, rng)


# ---------------------------------------------------------------- per format: YAML configs and --set


def _alias_bomb(levels: int = 9) -> str:
    """'Billion laughs' in YAML flow style: 9^9 list elements by reference, in a few hundred bytes of text."""
    parts = ["&a0 [" + ", ".join(["lol"] * 9) + "]"]
    parts += [f"&a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, levels)]
    return "[" + ", ".join(parts) + "]"


def yaml_hazards(marker: str) -> list[str]:
    """YAML values that must be refused or read as plain data, never constructed as Python objects."""
    q = shlex.quote(marker)
    return [f"!!python/object/apply:os.system ['touch {q}']", f"!!python/object/apply:subprocess.call [[touch, {q}]]",
            f"!!python/object/new:builtins.exec [\"open('{marker}', 'w').close()\"]", "!!python/name:os.system",
            "!!python/module:os", "!!python/object:builtins.object {}",
            f"!<tag:yaml.org,2002:python/object/apply:os.system> ['touch {q}']", "!!binary AAEC", "!!set {a, b}",
            "!!timestamp 2001-12-14t21:59:43.10-05:00", "!!float .nan", ".inf", "-.inf", "!!int " + "9" * 5000,
            "9" * 5000, "[" * 5000 + "]" * 5000, "{a: " * 3000 + "1" + "}" * 3000, "&a [*a]", _alias_bomb(),
            "*undefined", "'unterminated", "\t1", "~", "yes", "0o777", "1_000", "2001-12-14", "{a: 1, a: 2}",
            "[1, [2, [3]]]", "x" * 10_000, "1e999", "-1e999", ".nan"]


def _yaml_case(seed: bytes, rng: np.random.Generator, marker: str) -> tuple[str, bytes]:
    """One value line of the config replaced by a hazard (now and then under a %TAG directive that renames a
    python/ tag), or the structural edits in YAML."""
    import yaml

    if rng.integers(2):
        doc = yaml.safe_load(seed)
        for _ in range(int(rng.integers(1, 4))):
            doc = edit_tree(doc, rng)
        return "tree", _splice(yaml.safe_dump(doc, sort_keys=False), quoted=False).encode("utf-8", "surrogatepass")
    lines = seed.decode().splitlines()
    values = [i for i, ln in enumerate(lines) if ": " in ln and not ln.lstrip().startswith("#")]
    i = values[int(rng.integers(len(values)))]
    hazards = yaml_hazards(marker)
    hazard = hazards[int(rng.integers(len(hazards)))]
    if rng.integers(8) == 0:
        lines = ["%TAG !x! tag:yaml.org,2002:python/", "---", *lines]
        i, hazard = i + 2, f"!x!object/apply:os.system ['touch {shlex.quote(marker)}']"
    lines[i] = lines[i].split(": ", 1)[0] + ": " + hazard
    return "yaml", ("\n".join(lines) + "\n").encode()


def _leaf_keys(doc: dict, prefix: str = "") -> list[str]:
    return [k for key, v in doc.items() for k in (_leaf_keys(v, f"{prefix}{key}.") if isinstance(v, dict) and v
                                                   else [f"{prefix}{key}"])]


def _overrides(seed: bytes, rng: np.random.Generator, marker: str) -> tuple[str, ...]:
    """1-3 hostile --set items: known, unknown and malformed keys; values that are hazards, hostile scalars in
    YAML, or empty."""
    import yaml

    known = _leaf_keys(yaml.safe_load(seed))
    sections = sorted({k.split(".")[0] for k in known})
    values = yaml_hazards(marker) + ["", "null", "[]", "{}", "-1", "0", "1.5", "2e308", str(2**63), "x", "a=b"]
    out = []
    for _ in range(int(rng.integers(1, 4))):
        key = [known[int(rng.integers(len(known)))], sections[int(rng.integers(len(sections)))],
               f"{sections[int(rng.integers(len(sections)))]}.unknown", f"{known[int(rng.integers(len(known)))]}.x",
               "", ".", "train..lr", "a" * 10_000][int(rng.choice(8, p=[.5, .1, .1, .1, .05, .05, .05, .05]))]
        value = values[int(rng.integers(len(values)))]
        out.append(key if rng.integers(20) == 0 else f"{key}={value}")
    return tuple(out)


def _config_case(seed: bytes, rng: np.random.Generator, marker: str) -> tuple[str, bytes, tuple[str, ...]]:
    kind = ("bytes", "text", "yaml", "yaml", "set")[int(rng.integers(5))]
    if kind == "set":
        return kind, seed, _overrides(seed, rng, marker)
    if kind == "yaml":
        kind, data = _yaml_case(seed, rng, marker)
        return kind, data, ()
    return kind, _byte_mutations(seed, rng, ascii_only=kind == "text"), ()


# ---------------------------------------------------------------- cases


def marker_name(seed: int, index: int) -> str:
    return f"{EXECUTED}-{seed}-{index}"


def reader_case(seed: int, index: int, seeds: ReaderSeeds) -> ReaderCase:
    """Case `index` of the reader campaign seeded `seed`: reader index % len(READERS), its mutation drawn from
    (seed, index) alone."""
    rng = np.random.default_rng([seed, index])
    reader = READERS[index % len(READERS)]
    base, marker = seeds.files[reader], marker_name(seed, index)
    if reader == "model":
        return ReaderCase(reader, *_model_case(base, rng, marker))
    if reader == "config":
        return ReaderCase(reader, *_config_case(base, rng, marker))
    if reader == "part":
        return ReaderCase(reader, *_part_case(base, rng))
    return ReaderCase(reader, *_json_case(base, rng))


# ---------------------------------------------------------------- reading, and the contracts


def prepare_workspace(ws: Path, seeds: ReaderSeeds) -> Path:
    """The directories the readers read in: the predictions directory holds the files its manifest lists, the
    ensemble's the members its manifest lists."""
    members = {f"ensemble/models/{n}/model.pt": seeds.files["model"] for n in ("a", "b")}
    for name, data in {**{f"predictions/{n}": d for n, d in seeds.published.items()}, **members}.items():
        (ws / name).parent.mkdir(parents=True, exist_ok=True)
        (ws / name).write_bytes(data)
    for d in ("ensemble", "digits", "run", "config", f".staging-{RUN_ID}", "predictions/.leases"):
        (ws / d).mkdir(parents=True, exist_ok=True)
    return ws


def _read_ensemble(data: bytes, ws: Path, _) -> Any:
    """As `predict` and the bulk job read one: the manifest, then the predictor of its members (in fp32: a
    conversion to bf16 is no part of reading)."""
    from imgcls_dist.predictor.manifest import load_ensemble_manifest
    from imgcls_dist.predictor.predictor import EnsemblePredictor

    (ws / "ensemble" / "ensemble.json").write_bytes(data)
    spec = load_ensemble_manifest(ws / "ensemble" / "ensemble.json")
    return spec, EnsemblePredictor.from_spec(spec, device="cpu", precision="fp32")


def _read_manifest(data: bytes, ws: Path, _) -> Any:
    from imgcls_dist.batch.publish import MANIFEST, prediction_files, read_manifest

    (ws / "predictions" / MANIFEST).write_bytes(data)
    return read_manifest(ws / "predictions"), prediction_files(ws / "predictions")


def _read_part(data: bytes, ws: Path, _) -> Any:
    from imgcls_dist.batch.parts import read_part
    from imgcls_dist.storage import location

    path = ws / f".staging-{RUN_ID}" / f"{RUN_ID}_0123456789abcdef.parquet"
    path.write_bytes(data)
    return read_part(location(path))


def _read_dataset(data: bytes, ws: Path, _) -> Any:
    from imgcls_dist.data.schema import DATASET_FILE, hflip_allowed, read_dataset_meta

    (ws / "digits" / DATASET_FILE).write_bytes(data)
    meta = read_dataset_meta(ws / "digits")
    return meta, hflip_allowed(meta)


def _read_model(data: bytes, ws: Path, _) -> Any:
    from imgcls_dist.models.registry import build_model_from_file

    (ws / "run" / "model.pt").write_bytes(data)
    return build_model_from_file(ws / "run")


def _read_fingerprint(data: bytes, ws: Path, seeds: ReaderSeeds) -> Any:
    """As a resuming run does: the staging's fingerprint, then how it differs from the run's own."""
    from imgcls_dist.batch.resume import FINGERPRINT, difference, read_fingerprint
    from imgcls_dist.storage import location

    (ws / f".staging-{RUN_ID}" / FINGERPRINT).write_bytes(data)
    old = read_fingerprint(location(ws / f".staging-{RUN_ID}"))
    return old, None if old is None else difference(old, json.loads(seeds.files["fingerprint"]))


def _read_lease(data: bytes, ws: Path, _) -> Any:
    """As a run taking the lease does with each lease file it finds: is it stale, and how old."""
    from imgcls_dist.batch.publish import LEASES, Lease
    from imgcls_dist.storage import location

    other = ws / "predictions" / LEASES / "other.json"
    other.write_bytes(data)
    return Lease(location(ws / "predictions"), RUN_ID)._stale(location(other), time.time_ns())


def read_case(case: ReaderCase, ws: Path, seeds: ReaderSeeds) -> Any:
    """Write the case's file where its reader looks and call the reader as the commands do."""
    if case.reader == "config":
        from imgcls_dist.config import load_config

        (ws / "config" / "config.yaml").write_bytes(case.data)
        return load_config(ws / "config" / "config.yaml", list(case.overrides))
    read = {"ensemble": _read_ensemble, "manifest": _read_manifest, "part": _read_part, "dataset": _read_dataset,
            "model": _read_model, "fingerprint": _read_fingerprint, "lease": _read_lease}[case.reader]
    return read(case.data, ws, seeds)


def _result_violation(reader: str, result: Any) -> str | None:
    """Why a returned result breaks its reader's contract, or None."""
    import torch

    from imgcls_dist.config import ExperimentConfig
    from imgcls_dist.predictor.manifest import EnsembleSpec
    from imgcls_dist.predictor.predictor import EnsemblePredictor

    ok = {
        "ensemble": lambda r: isinstance(r[0], EnsembleSpec) and isinstance(r[1], EnsemblePredictor),
        "manifest": lambda r: isinstance(r[0], dict) and isinstance(r[1], list),
        "part": lambda r: r is None or r.rows >= 0,
        "dataset": lambda r: isinstance(r[0], dict) and isinstance(r[1], bool),
        "model": lambda r: isinstance(r[0], torch.nn.Module) and isinstance(r[1], dict),
        "config": lambda r: isinstance(r, ExperimentConfig),
        "fingerprint": lambda r: r[0] is None or isinstance(r[0], dict) and (r[1] is None or isinstance(r[1], str)),
        "lease": lambda r: isinstance(r[0], bool) and isinstance(r[1], float),
    }[reader]
    return None if ok(result) else f"returned {type(result).__name__}"


def reader_outcome(case: ReaderCase, ws: Path, seeds: ReaderSeeds, marker: str) -> tuple[str, str | None]:
    """("ok" | "refused" | "violation", why): refused is the reader's clean refusal (a one-line UserError or
    JobFailed, or None from the readers that answer None for a file that is not theirs)."""
    from imgcls_dist.errors import JobFailed, UserError

    cwd = os.getcwd()
    os.chdir(ws)  # where a hostile file's relative marker would land
    try:
        result = read_case(case, ws, seeds)
        outcome, why = ("refused", None) if _refused(case.reader, result) else \
            ("ok", _result_violation(case.reader, result))
    except (UserError, JobFailed) as e:
        msg = str(e)
        short = msg and "\n" not in msg and len(msg) <= MAX_ERROR_CHARS + len(case.data) + len("".join(case.overrides))
        outcome, why = "refused", None if short else f"error not one short line ({len(msg)} chars): {msg[:200]!r}"
    except CaseTimeout:
        raise
    except BaseException as e:  # noqa: BLE001 - what the contract forbids is what is counted
        outcome, why = "violation", f"raised {type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"
    finally:
        os.chdir(cwd)
    if os.path.lexists(ws / marker):
        why = f"ran code from the file ({marker} created)"
    return ("violation", why) if why else (outcome, None)


def _refused(reader: str, result: Any) -> bool:
    return (reader == "part" and result is None) or (reader == "fingerprint" and result[0] is None)


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
    for model in (malicious_model(EXECUTED, 0), _saved(unknown_arch)):
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
