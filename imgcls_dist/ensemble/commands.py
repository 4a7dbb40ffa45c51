"""CLI subcommand `ensemble build` (registered by cli.py): parse and call `ensemble.build.build_ensemble`."""

from __future__ import annotations

import argparse

from imgcls_dist.predictor.commands import add_precision_arg
from imgcls_dist.predictor.options import BATCH_SIZE
from imgcls_dist.tracking.reports import add_mlflow_run_arg, log_report, preflight


def cmd_ensemble_build(a: argparse.Namespace) -> int:
    from imgcls_dist.ensemble.build import CALIBRATION_PLOT, build_ensemble, manifest_location

    run = preflight(a.mlflow_run, "ensemble build")
    doc = build_ensemble(a.models, a.val, a.out, batch_size=a.batch_size, max_rows=a.max_rows,
                         precision=a.precision)
    manifest = manifest_location(a.out)
    result = doc["validation"]["result"]
    log_report(run, "ensemble build", [manifest, manifest.parent / CALIBRATION_PLOT],
               {"members": len(doc["models"]), "val_rows": doc["validation"]["rows"],
                **{f"val_{k}": v for k, v in result.items()}})
    return 0


def _positive(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r}: expected a positive integer") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"{s!r}: expected a positive integer")
    return v


def register_ensemble_commands(sub) -> None:
    p = sub.add_parser("ensemble", help="build an ensemble on validation data (temperatures, members, TTA views)")
    esub = p.add_subparsers(dest="ensemble_command", required=True)
    b = esub.add_parser("build", help="fit temperatures, select members and TTA views on the validation split")
    b.add_argument("--models", nargs="+", required=True, metavar="PATH",
                   help="candidate model files / checkpoint dirs, one ensemble.json, or a tune campaign directory")
    b.add_argument("--val", required=True,
                   help="dataset directory (its val/ split is used, never test/) or labelled Parquet shards")
    b.add_argument("--out", required=True, help="ensemble.json to write (or a directory to hold it)")
    b.add_argument("--batch-size", type=_positive, default=BATCH_SIZE, help="images per forward, before TTA views")
    b.add_argument("--max-rows", type=_positive, default=None, help="use at most this many validation rows")
    add_precision_arg(b)  # temperatures are fitted on logits of the precision inference runs in
    add_mlflow_run_arg(b)
    b.set_defaults(func=cmd_ensemble_build)
