"""`imgcls-dist bench {train,infer,augment,decode,serve,tune,gpu,ingest,storage,train-ingest,checkpoint,
ensemble}`: each prints ratios measured in one run."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from imgcls_dist.config import add_config_args

DIGITS = "data/digits"  # `imgcls-dist ingest builtin:digits data/digits`


def _save(result: dict, path: str | None) -> None:
    if path:
        Path(path).write_text(json.dumps(result, indent=2, default=str))
        print(f"wrote {path}")


def cmd_bench(a: argparse.Namespace) -> int:
    if a.what == "train":
        from benchmarks.train_bench import bench_train

        r = bench_train(a.config or "configs/resnet18_digits.yaml", data=a.data or DIGITS, epochs=a.epochs,
                        overrides=tuple(a.overrides))
    elif a.what == "checkpoint":
        from benchmarks.train_bench import bench_checkpoint_cost

        r = bench_checkpoint_cost(a.config or "configs/resnet18_digits.yaml", data=a.data or DIGITS, epochs=a.epochs,
                                  overrides=tuple(a.overrides))
    elif a.what == "infer":
        from benchmarks.infer_bench import bench_infer, bench_infer_photos, bench_predict_latency

        r = bench_infer(rows=tuple(int(x) for x in a.rows.split(",")), arch=a.arch, batch_size=a.batch_size)
        r["predict_latency"] = bench_predict_latency()
        if a.photo_rows:
            r["photos"] = bench_infer_photos(rows=tuple(int(x) for x in a.photo_rows.split(",")))
    elif a.what == "ingest":
        from benchmarks.ingest_bench import bench_ingest

        r = bench_ingest(files=tuple(int(x) for x in a.files.split(",")))
    elif a.what == "train-ingest":
        from benchmarks.train_ingest_bench import bench_train_ingest

        r = bench_train_ingest(gigabytes=tuple(float(x) for x in a.gigabytes.split(",")))
    elif a.what == "storage":
        from benchmarks.ingest_bench import bench_storage

        r = bench_storage()
    elif a.what == "ensemble":
        from benchmarks.ensemble_bench import bench_ensemble

        r = bench_ensemble(data=a.data or "data/digits-test30")
    elif a.what == "augment":
        from benchmarks.augment_bench import bench_augment

        r = bench_augment(image_size=a.image_size)
    elif a.what == "decode":
        from benchmarks.decode_bench import bench_decode

        r = bench_decode()
    elif a.what == "serve":
        from benchmarks.serve_bench import bench_serve

        r = bench_serve(concurrency=tuple(int(x) for x in a.concurrency.split(",")), requests=a.requests,
                        time_limit_s=a.time_limit)
    elif a.what == "tune":
        from imgcls_dist.config import load_config
        from imgcls_dist.tune.asha_saving import format_saving_table, measure_asha_saving

        cfg = load_config(a.config or "configs/tune_digits.yaml", [f"data.path={a.data or DIGITS}", *a.overrides])
        r = measure_asha_saving(cfg)
        print(format_saving_table(r))
    else:
        from benchmarks.gpu_bench import run

        r = run(out=a.out or "gpu_bench.json")
    _save(r, a.out if a.what != "gpu" else None)
    return 0


def register_bench_commands(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks that print ratios measured in one run (see docs/benchmarks.md)")
    p.add_argument("what", choices=["train", "infer", "augment", "decode", "serve", "tune", "gpu", "ingest",
                                     "storage", "train-ingest", "checkpoint", "ensemble"])
    add_config_args(p, required=False)  # train/tune: experiment config and overrides
    p.add_argument("--data", default=None, help="train/tune/checkpoint: dataset directory (default data/digits); "
                   "ensemble: default data/digits-test30, ingested with --splits 0.6,0.1,0.3")
    p.add_argument("--epochs", type=int, default=3, help="train: epochs per side")
    p.add_argument("--rows", default="10000,50000", help="infer: input row counts to compare memory at")
    p.add_argument("--arch", default="resnet18", help="infer: model")
    p.add_argument("--batch-size", type=int, default=256, help="infer: batch size")
    p.add_argument("--photo-rows", default="100,300", help="infer: 12 MP photo row counts of the photo-vs-thumbnail "
                   "arm ('' skips it)")
    p.add_argument("--image-size", type=int, default=64, help="augment: output size")
    p.add_argument("--files", default="10000,40000", help="ingest: JPEG tree sizes to compare memory at")
    p.add_argument("--gigabytes", default="1,4", help="train-ingest: training shard sizes to compare memory at")
    p.add_argument("--concurrency", default="1,16", help="serve: client threads per load level")
    p.add_argument("--requests", type=int, default=200, help="serve: requests per load level")
    p.add_argument("--time-limit", type=float, default=60.0, help="serve: seconds per load level at most")
    p.add_argument("--out", default=None, help="write the result as JSON")
    p.set_defaults(func=cmd_bench)
