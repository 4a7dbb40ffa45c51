"""The reader campaign's seed files: one valid file per reader in READERS, written by the project's own writers
(`reader_seeds`), and the names and fixed values (classes, run id) the cases and the reading share."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

READERS = ("ensemble", "manifest", "part", "dataset", "model", "config", "fingerprint", "lease")
CLASSES = ["0", "1", "2"]
RUN_ID = "20261205-000000-fuzz"


@dataclass(frozen=True)
class ReaderSeeds:
    files: dict[str, bytes]  # reader -> the valid file its cases corrupt
    published: dict[str, bytes]  # the prediction files the predictions manifest lists, by name


# ---------------------------------------------------------------- seeds: the project's writers


def model_payload_args(config: dict) -> dict[str, Any]:
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
                            **model_payload_args(cfg.to_dict()))
    write_config(cfg, workdir / "config.yaml")
    meta = ingest("builtin:digits", workdir / "digits", classes=CLASSES, verbose=False)
    meta["wall_s"] = 0.5
    manifest, published, part = _predictions_dir(workdir / "predictions")
    files = {"ensemble": _ensemble_manifest(), "manifest": manifest, "part": part,
             "dataset": json.dumps(meta, indent=2).encode(), "model": model.read_bytes(),
             "config": (workdir / "config.yaml").read_bytes(), "fingerprint": _fingerprint(Path(model.path)),
             "lease": _lease()}
    return ReaderSeeds(files, published)
