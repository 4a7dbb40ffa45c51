"""CLI subcommands of the inference side: infer, evaluate, predict. Each parses and calls one function."""

from __future__ import annotations

import argparse


def _weights(s: str) -> list[float]:
    try:
        return [float(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r}: expected comma-separated numbers like 0.6,0.4") from None


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", nargs="+", required=True, metavar="PATH",
                   help="one ensemble.json, or model files / checkpoint directories")
    p.add_argument("--tta", default=None,
                   help="comma-separated views (identity,hflip,vflip,shift_up,shift_down,shift_left,shift_right,"
                        "zoom_in,zoom_out), 'none', or 'default' (the views every model saw in training, read from the "
                        "augmentation config in its model file)")
    p.add_argument("--weights", type=_weights, default=None, help="per-model weights, e.g. 0.6,0.4")
    p.add_argument("--combine", choices=("mean", "weighted", "vote"), default=None,
                   help="how members are combined (default: the manifest's; weighted with --weights; else mean)")


def cmd_infer(a: argparse.Namespace) -> int:
    from imgcls_dist.infer.pipeline import run_batch_inference

    run_batch_inference(a.models, a.input, a.output, tta=a.tta, batch_size=a.batch_size, weights=a.weights,
                        combine=a.combine, num_actors=a.actors, fresh=a.fresh, decode=a.decode, compile=a.compile)
    return 0


def cmd_predict(a: argparse.Namespace) -> int:
    from imgcls_dist.infer.predict import format_predictions, predict_images

    results = predict_images(a.images, a.models, topk=a.topk, tta=a.tta, weights=a.weights, combine=a.combine)
    print(format_predictions(results))
    return 0


def cmd_evaluate(a: argparse.Namespace) -> int:
    from imgcls_dist.evaluate.report import evaluate_predictions, parse_compare

    evaluate_predictions(a.out, classes_file=a.classes, compare=parse_compare(a.compare), report_dir=a.report_dir,
                         name=a.name)
    return 0


def register_infer_commands(sub) -> None:
    p = sub.add_parser("infer", help="batch inference over Parquet shards with Ray Data (ensemble + TTA)")
    add_model_args(p)
    p.add_argument("--input", required=True, help="Parquet file, directory or glob with id + image columns")
    p.add_argument("--output", required=True,
                   help="predictions directory (replaced on rerun; an interrupted run of the same inputs, models "
                        "and TTA into it is resumed: only rows it had not written are predicted)")
    p.add_argument("--fresh", action="store_true",
                   help="discard an interrupted run's staged predictions in --output and start from row 0 (needed "
                        "to rerun with other inputs, models, views, weights or temperatures after a crash)")
    p.add_argument("--batch-size", type=int, default=128, help="images per forward, before TTA views")
    p.add_argument("--decode", default="auto",  # checked by pipeline.resolve_decode (one list of modes)
                   help="where images are decoded: cpu (Ray tasks, JPEGs at a reduced DCT scale), device (in the "
                        "predictor actors, JPEGs by nvJPEG on their GPU, other rows on their CPUs); auto: device "
                        "when the actors have GPUs, else cpu")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile each model in the predictor actors (inductor, one graph per model: the last "
                        "batch of a call is padded); costs a compile per actor at start, pays off on long GPU jobs")
    p.add_argument("--actors", type=int, default=None,
                   help="predictor actors (default: one per GPU; on CPUs, one per CPU left after keeping "
                        "a quarter of them, at least 1, for read/decode tasks)")
    p.set_defaults(func=cmd_infer)

    p = sub.add_parser("predict", help="top-k classes for local image files (no Ray)")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    add_model_args(p)
    p.add_argument("--topk", type=int, default=5)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("evaluate", help="accuracy, per-class report and confusion matrix of a predictions directory")
    p.add_argument("out", metavar="OUT", help="predictions directory written by infer")
    p.add_argument("--classes", default=None, help="dataset.json (or dataset dir) to take class names from")
    p.add_argument("--compare", nargs="*", default=[], metavar="NAME=OUT",
                   help="other prediction sets to compare accuracy with (e.g. single models, no TTA)")
    p.add_argument("--name", default=None, help="name of OUT in the comparison table (default: its directory name)")
    p.add_argument("--report-dir", default=None, help="where report files go (default OUT/eval)")
    p.set_defaults(func=cmd_evaluate)
