"""`python -m benchmarks bulk-cpu`: the bulk `infer` job on CPU, resnet18 at 224 px on photo JPEGs, one view, in
each forward choice, against the job in fp32 torch (what it ran before `--precision`/`--backend`) and against
the loop a user would write: the same images decoded and resized beforehand, fed in batches to the fp32 model
(`model(x)` under `torch.inference_mode`, torch's default threads), so the loop pays no decode at all.

Job rates are marginal (extra rows / extra wall time between two input sizes, as `python -m benchmarks infer`
measures them: Ray Data's start-up is not in them). Inputs: `data.synthetic.photo_jpeg` 640x480 photos of the
digits, `distinct` of them repeated; random-init resnet18 (speed does not depend on the weights), so the
top-1 agreement printed between the arms' rows is for near-uniform probabilities, a harsh case for any
rounding; agreement on trained models: `python -m benchmarks precision` and `python -m benchmarks backends`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow.parquet as pq
import torch

from benchmarks.common import machine, print_table
from benchmarks.infer_bench import _marginal_rate, _photo_inputs, make_bench_model
from benchmarks.precision_bench import _dataset

SIZE = 224
ARMS = {"job fp32 torch": {"precision": "fp32", "backend": "torch"},
        "job auto": {"precision": "auto", "backend": "auto"},
        "job onnxruntime fp32": {"precision": "auto", "backend": "onnxruntime"},
        "job int8": {"precision": "int8", "backend": "auto"}}  # + calibration: the digits' validation split


def plain_loop_rate(model_path: Path, files: Sequence[Path], batch_size: int) -> float:
    """img/s of the fp32 model over the files' images, decoded and resized beforehand (not timed)."""
    from imgcls_dist.data.schema import IMAGE
    from imgcls_dist.models.preprocess import normalize
    from imgcls_dist.models.registry import build_model_from_file
    from imgcls_dist.predictor.prepare import prepare_encoded

    model, meta = build_model_from_file(model_path)
    images = [b for f in files for b in pq.read_table(f, columns=[IMAGE]).column(IMAGE).to_pylist()]
    arrays, _ = prepare_encoded(images, [(SIZE, 3)])
    x = torch.from_numpy(arrays[(SIZE, 3)]).permute(0, 3, 1, 2)
    batches = [normalize(x[i:i + batch_size], meta["mean"], meta["std"]) for i in range(0, len(x), batch_size)]
    with torch.inference_mode():
        model(batches[0][:2])  # warm-up
        t0 = time.perf_counter()
        for b in batches:
            model(b).softmax(-1)
        return len(x) / (time.perf_counter() - t0)


def _preds(out: Path) -> dict[str, int]:
    t = pq.read_table(sorted(out.glob("*.parquet")), columns=["id", "pred"])
    return dict(zip(t.column("id").to_pylist(), t.column("pred").to_pylist()))


def bench_bulk_cpu(rows: Sequence[int] = (256, 1280), batch_size: int = 64,
                   workdir: str = "runs/bench_bulk_cpu") -> dict[str, Any]:
    from imgcls_dist.batch.pipeline import run_batch_inference
    from imgcls_dist.ray_utils import ensure_ray

    work = Path(workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    model_path, _ = make_bench_model(work, "resnet18", SIZE)
    inputs = _photo_inputs(work, rows, distinct=16, per_shard=32, size=(640, 480))
    calibration = _dataset(None, work)
    ensure_ray()
    job = {"tta": "none", "batch_size": batch_size, "fresh": True}
    run_batch_inference(model_path, inputs[min(rows)], work / "warmup", verbose=False, **job)
    rates, runs = {}, {}
    for arm, kw in ARMS.items():
        kw = {**kw, "calibration": calibration} if kw["precision"] == "int8" else kw
        rates[arm], runs[arm] = _marginal_rate(model_path, inputs, work / arm.replace(" ", "_"), **job, **kw)
    loop = plain_loop_rate(model_path, inputs[max(rows)], batch_size)
    base, biggest = rates["job fp32 torch"], max(rows)
    ref = _preds(work / "job_fp32_torch" / f"out-{biggest}")
    table = [{"arm": arm, "img/s": r, "vs fp32 job": r / base, "vs plain fp32 loop": r / loop,
              "top1 vs fp32 job": float(np.mean([p == ref[i] for i, p in
                                                 _preds(work / arm.replace(" ", "_") / f"out-{biggest}").items()]))}
             for arm, r in rates.items()]
    table.append({"arm": f"plain fp32 loop ({torch.get_num_threads()} threads, decoded beforehand)", "img/s": loop,
                  "vs fp32 job": loop / base, "vs plain fp32 loop": 1.0, "top1 vs fp32 job": None})
    print(f"\n{machine()}\nbulk infer, resnet18@{SIZE} (random init), 640x480 JPEG photos, 1 view, batch {batch_size}; "
          f"job rates marginal between {rows[0]} and {rows[-1]} rows")
    print_table(table, ["arm", "img/s", "vs fp32 job", "vs plain fp32 loop", "top1 vs fp32 job"])
    return {"machine": machine(), "rows": list(rows), "table": table, "runs": runs}
