"""The reader campaign's cases: structural and per-format mutations of the seed files (Parquet footers, model
files and hostile pickles, YAML configs and `--set` overrides), and `reader_case`, case (seed, index) of a run."""

from __future__ import annotations

import copy
import functools
import io
import json
import os
import shlex
import zipfile
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from benchmarks.fuzz_bench import mutate
from benchmarks.reader_fuzz_seeds import READERS, ReaderSeeds, model_payload_args

# Each reader gets corrupted copies of a valid file written by the project's own writer: byte-level mutations
# (the decoder's `mutate`), structural ones on the parsed document (wrong types, missing and unknown keys, huge
# numbers, NaN, deep nesting), and per format: a model file's pickle mutated inside a well-formed zip, and
# hostile pickles that call os.system & co. on an unrestricted load; YAML tags, anchors and directives, and
# hostile `--set` overrides for configs.

EXECUTED = "imgcls-fuzz-executed"  # what a hostile file creates, relative to the reader's working directory

# Placeholders for what json/yaml cannot write, spliced in as text: an integer past Python's 4300-digit limit
# for int() (the parsers raise ValueError) and nesting past the recursion limit (RecursionError).
HUGE_INT, DEEP = "fuzz_huge_int", "fuzz_deep_nesting"
SPLICES = {HUGE_INT: "9" * 5000, DEEP: "[" * 50_000 + "]" * 50_000}
HOSTILE = (None, True, False, 0, -1, 1.5, 2**63, -(2**63) - 1, 1e308, float("nan"), float("inf"), float("-inf"),
           "", "x" * 10_000, "\ud800", "a\x00b", "../../outside", "s3://", "NaN", [], {}, [[]], [None, None],
           {"": None}, HUGE_INT, DEEP)


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

    payload: Any = {"state_dict": {"w": torch.zeros(2)}, "num_classes": 3, **model_payload_args({})}
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


def torch_saved(payload: Any) -> bytes:
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
        return kind, torch_saved(payload)
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
