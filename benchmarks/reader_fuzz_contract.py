"""Reading a reader case as the commands do (`read_case`, in a workspace from `prepare_workspace`), and judging
the outcome by its reader's contract (`reader_outcome`)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from benchmarks.reader_fuzz_cases import ReaderCase
from benchmarks.reader_fuzz_seeds import RUN_ID, ReaderSeeds

# A reader's contract: its result, or its documented refusal (UserError / JobFailed with a one-line message; None
# where the reader returns None for a file that is not one of ours), and never code from the file run.

MAX_ERROR_CHARS = 1000  # a refusal may quote its input, but say no more than this beside it


class CaseTimeout(BaseException):
    """A reader case ran past CASE_LIMIT_S (a BaseException: the readers' own `except Exception` keep out)."""


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
