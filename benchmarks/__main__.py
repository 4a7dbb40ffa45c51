"""`python -m benchmarks NAME`: each benchmark prints ratios measured in one run (ours vs a baseline), and
`--out` writes its result as JSON. Results and their commands are recorded in docs/benchmarks.md. The GPU
benchmark has an entry point of its own, free of Ray: `python -m benchmarks.gpu_bench`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable

from imgcls_dist.config import add_config_args
from imgcls_dist.errors import JobFailed, UserError

DIGITS = "data/digits"  # `imgcls-dist ingest builtin:digits data/digits`


def _ints(s: str) -> tuple[int, ...]:
    return tuple(int(x) for x in s.split(",") if x.strip())


def _train(a: argparse.Namespace) -> dict[str, Any]:
    from benchmarks.train_bench import bench_train

    return bench_train(a.config or "configs/resnet18_digits.yaml", data=a.data or DIGITS, epochs=a.epochs,
                       overrides=tuple(a.overrides))


def _checkpoint(a: argparse.Namespace) -> dict[str, Any]:
    from benchmarks.train_bench import bench_checkpoint_cost

    return bench_checkpoint_cost(a.config or "configs/resnet18_digits.yaml", data=a.data or DIGITS,
                                 epochs=a.epochs, overrides=tuple(a.overrides))


def _infer(a: argparse.Namespace) -> dict[str, Any]:
    from benchmarks.infer_bench import bench_infer, bench_infer_photos, bench_predict_latency

    r = bench_infer(rows=_ints(a.rows), arch=a.arch, batch_size=a.batch_size)
    r["predict_latency"] = bench_predict_latency()
    if a.photo_rows:
        r["photos"] = bench_infer_photos(rows=_ints(a.photo_rows))
    return r


def _ingest(a: argparse.Namespace) -> dict[str, Any]:
    from benchmarks.ingest_bench import bench_ingest

    return bench_ingest(files=_ints(a.files))


def _train_ingest(a: argparse.Namespace) -> dict[str, Any]:
    from benchmarks.train_ingest_bench import bench_train_ingest

    return bench_train_ingest(gigabytes=tuple(float(x) for x in a.gigabytes.split(",")))


def _train_memory(a: argparse.Namespace) -> dict[str, Any]:
    from benchmarks.train_memory_bench import bench_train_memory

    return bench_train_memory(rows=_ints(a.memory_rows), row_groups=_ints(a.row_groups))


def _storage(a: argparse.Namespace) -> dict[str, Any]:
    from benchmarks.ingest_bench import bench_storage

    return bench_storage()


def _ensemble(a: argparse.Namespace) -> dict[str, Any]:
    from benchmarks.ensemble_bench import bench_ensemble

    return bench_ensemble(data=a.data or "data/digits-test30")


def _augment(a: argparse.Namespace) -> dict[str, Any]:
    from benchmarks.augment_bench import bench_augment, bench_policies

    return bench_policies() if a.policies else bench_augment(image_size=a.image_size or 64)


def _decode(a: argparse.Namespace) -> dict[str, Any]:
    from benchmarks.decode_bench import bench_decode

    return bench_decode()


def _serve(a: argparse.Namespace) -> dict[str, Any]:
    from benchmarks.serve_bench import bench_serve

    return bench_serve(concurrency=_ints(a.concurrency), requests=a.requests, time_limit_s=a.time_limit)


def _tune(a: argparse.Namespace) -> dict[str, Any]:
    from benchmarks.tune_bench import format_saving_table, measure_asha_saving
    from imgcls_dist.config import load_config

    cfg = load_config(a.config or "configs/tune_digits.yaml", [f"data.path={a.data or DIGITS}", *a.overrides])
    r = measure_asha_saving(cfg)
    print(format_saving_table(r))
    return r


def _study(a: argparse.Namespace) -> dict[str, Any]:
    from benchmarks.study_bench import bench_study

    return bench_study(config=a.config or "configs/study_pretrained.yaml", overrides=tuple(a.overrides))


def _distill(a: argparse.Namespace) -> dict[str, Any]:
    from benchmarks.distill_bench import bench_distill

    return bench_distill(data=a.data or "data/digits-test30", overrides=tuple(a.overrides))


def _short_epochs(a: argparse.Namespace) -> dict[str, Any]:
    from benchmarks.short_epochs_bench import bench_short_epochs

    return bench_short_epochs()


def _precision(a: argparse.Namespace) -> dict[str, Any]:
    from benchmarks.precision_bench import bench_precision

    return bench_precision(models=a.models, data=a.data, accuracy=not a.speed_only)


def _backends(a: argparse.Namespace) -> dict[str, Any]:
    from benchmarks.backend_bench import bench_backends

    return bench_backends(models=a.models, data=a.data, accuracy=not a.speed_only)


def _bulk_cpu(a: argparse.Namespace) -> dict[str, Any]:
    from benchmarks.bulk_cpu_bench import bench_bulk_cpu

    return bench_bulk_cpu()


def _bulk_preempt(a: argparse.Namespace) -> dict[str, Any]:
    from benchmarks.preempt_bench import SIZE, bench_bulk_preempt

    return bench_bulk_preempt(size=a.image_size or SIZE)


def _fuzz(a: argparse.Namespace) -> dict[str, Any]:
    from benchmarks.fuzz_bench import bench_fuzz
    from benchmarks.reader_fuzz_bench import bench_reader_fuzz

    r = {}
    if a.target in ("decode", "all"):
        r["decode"] = bench_fuzz(cases=a.cases, seed=a.seed)
    if a.target in ("readers", "all"):
        r["readers"] = bench_reader_fuzz(cases=a.reader_cases, seed=a.seed)
    return r


def _recipes(a: argparse.Namespace) -> dict[str, Any]:
    from benchmarks.recipe_bench import LAYERS, bench_recipes

    return bench_recipes(configs=a.config.split(",") if a.config else LAYERS, overrides=tuple(a.overrides))


def _imbalance(a: argparse.Namespace) -> dict[str, Any]:
    from benchmarks.imbalance_bench import LAYERS, bench_imbalance

    return bench_imbalance(configs=a.config.split(",") if a.config else LAYERS, overrides=tuple(a.overrides))


def _train_precision(a: argparse.Namespace) -> dict[str, Any]:
    from benchmarks.train_precision_bench import bench_train_precision

    return bench_train_precision()


BENCHMARKS: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
    "train": _train, "checkpoint": _checkpoint, "infer": _infer, "ingest": _ingest, "train-ingest": _train_ingest,
    "train-memory": _train_memory, "storage": _storage, "ensemble": _ensemble, "augment": _augment,
    "decode": _decode, "serve": _serve, "tune": _tune, "study": _study, "distill": _distill,
    "short-epochs": _short_epochs, "recipes": _recipes, "imbalance": _imbalance, "train-precision": _train_precision,
    "precision": _precision, "backends": _backends, "bulk-cpu": _bulk_cpu, "fuzz": _fuzz,
    "bulk-preempt": _bulk_preempt,
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    p.add_argument("what", choices=sorted(BENCHMARKS))
    add_config_args(p, required=False, layered=False)  # train/tune/checkpoint: experiment config and overrides
    p.add_argument("--data", default=None, help="train/tune/checkpoint: dataset directory (default data/digits); "
                   "ensemble, distill: default data/digits-test30, ingested with --splits 0.6,0.1,0.3; precision, "
                   "backends: default builtin:digits ingested into runs/bench_precision")
    p.add_argument("--epochs", type=int, default=3, help="train: epochs per side")
    p.add_argument("--rows", default="10000,50000", help="infer: input row counts to compare memory at")
    p.add_argument("--arch", default="resnet18", help="infer: model")
    p.add_argument("--batch-size", type=int, default=256, help="infer: batch size")
    p.add_argument("--photo-rows", default="100,300", help="infer: 12 MP photo row counts of the photo-vs-thumbnail "
                   "arm ('' skips it)")
    p.add_argument("--image-size", type=int, default=None,
                   help="augment: output size (default 64); bulk-preempt: the model's input size (default 160)")
    p.add_argument("--policies", action="store_true", help="augment: the policy presets' torchvision policies "
                   "(uint8 tensor vs PIL, and their seeded wrapper) instead of the presets")
    p.add_argument("--files", default="10000,40000", help="ingest: JPEG tree sizes to compare memory at")
    p.add_argument("--gigabytes", default="1,4", help="train-ingest: training shard sizes to compare memory at")
    p.add_argument("--memory-rows", default="5000,20000", help="train-memory: training rows of the two datasets")
    p.add_argument("--row-groups", default="128,512", help="train-memory: rows per row group")
    p.add_argument("--concurrency", default="1,16", help="serve: client threads per load level")
    p.add_argument("--requests", type=int, default=200, help="serve: requests per load level")
    p.add_argument("--time-limit", type=float, default=60.0, help="serve: seconds per load level at most")
    p.add_argument("--models", nargs="+", default=None, metavar="PATH",
                   help="precision: trained model files for the bf16-vs-fp32 agreement (default: lenet5_digits and "
                        "resnet18_digits trained for 10 epochs on --data, or on builtin:digits ingested here)")
    p.add_argument("--speed-only", action="store_true", help="precision, backends: the speed arms only, no agreement")
    p.add_argument("--cases", type=int, default=100_000, help="fuzz: decode cases")
    p.add_argument("--reader-cases", type=int, default=16_000, help="fuzz: reader cases (spread over the readers)")
    p.add_argument("--target", choices=("decode", "readers", "all"), default="all",
                   help="fuzz: the decoder, the readers of the files the system writes, or both")
    p.add_argument("--seed", type=int, default=0, help="fuzz: the run's seed (a case is (seed, index))")
    p.add_argument("--out", default=None, help="write the result as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        result = BENCHMARKS[a.what](a)
    except (UserError, JobFailed) as e:
        print(f"benchmarks {a.what}: error: {e}", file=sys.stderr)
        return e.exit_code
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=2, default=str))
        print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
