"""CLI subcommand `infer`: parse and call `batch.pipeline.run_batch_inference`."""

from __future__ import annotations

import argparse

from imgcls_dist.predictor.commands import add_model_args
from imgcls_dist.predictor.options import BATCH_SIZE
from imgcls_dist.preemption import DEFAULT_GRACE_S
from imgcls_dist.tracking.reports import add_mlflow_run_arg, log_report, preflight


# What `--mlflow-run` logs: the job's numbers from its manifest, and the manifest itself.
LOGGED_METRICS = ("rows_in", "rows_predicted", "error_rows", "images_per_s", "wall_s")


def cmd_infer(a: argparse.Namespace) -> int:
    from imgcls_dist.batch.pipeline import run_batch_inference
    from imgcls_dist.batch.publish import MANIFEST
    from imgcls_dist.storage import location

    run = preflight(a.mlflow_run, "infer")
    manifest = run_batch_inference(a.models, a.input, a.output, tta=a.tta, batch_size=a.batch_size, weights=a.weights,
                        combine=a.combine, num_actors=a.actors, fresh=a.fresh, decode=a.decode, compile=a.compile,
                        precision=a.precision, backend=a.backend, calibration=a.calibration,
                        stop_grace_s=a.stop_grace)
    log_report(run, "infer", [location(a.output) / MANIFEST], {k: manifest[k] for k in LOGGED_METRICS})
    return 0


def register_infer_command(sub) -> None:
    p = sub.add_parser("infer", help="batch inference over Parquet shards with Ray Data (ensemble + TTA)")
    add_model_args(p)
    p.add_argument("--input", required=True, help="Parquet file, directory or glob with id + image columns")
    p.add_argument("--output", required=True,
                   help="predictions directory (replaced on rerun; an interrupted run of the same inputs, models "
                        "and TTA into it is resumed: only rows it had not written are predicted)")
    p.add_argument("--fresh", action="store_true",
                   help="discard an interrupted run's staged predictions in --output and start from row 0 (needed "
                        "to rerun with other inputs, models, views, weights, temperatures, precision, backend or "
                        "calibration after a crash)")
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="images per forward, before TTA views")
    p.add_argument("--decode", default="auto",  # checked by predictor.decode_mode.resolve_decode (one list of modes)
                   help="where images are decoded: cpu (Ray tasks, JPEGs at a reduced DCT scale), device (in the "
                        "predictor actors, JPEGs by nvJPEG on their GPU, other rows on their CPUs); auto: device "
                        "when the actors have GPUs, else cpu")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile each model in the predictor actors (inductor, one graph per model: the last "
                        "batch of a call is padded); costs a compile per actor at start, pays off on long GPU jobs")
    p.add_argument("--actors", type=int, default=None,
                   help="predictor actors (default: one per GPU; on CPUs, one per CPU left after keeping "
                        "a quarter of them, at least 1, for read/decode tasks)")
    p.add_argument("--stop-grace", type=float, default=DEFAULT_GRACE_S, metavar="SECONDS",
                   help="on SIGTERM (pod deletion, `ray job stop`), write the rows predicted so far and exit (status "
                        "143) within this many seconds; the same command again predicts the rest (default: "
                        "%(default)g, inside Kubernetes' 30 s)")
    add_mlflow_run_arg(p)
    p.set_defaults(func=cmd_infer)
