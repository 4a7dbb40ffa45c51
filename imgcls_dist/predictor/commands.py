"""CLI subcommand `predict`, and the model arguments every inference command shares (predict, infer, serve;
`ensemble build` takes --precision too)."""

from __future__ import annotations

import argparse

from imgcls_dist.predictor.options import (BACKEND_HELP, BACKENDS, CALIBRATION_ROWS, COMBINES, FLOAT_PRECISIONS,
                                           INT8_HELP, PRECISION_HELP, PRECISIONS, VIEW_NAMES)


def _weights(s: str) -> list[float]:
    try:
        return [float(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r}: expected comma-separated numbers like 0.6,0.4") from None


def add_precision_arg(p: argparse.ArgumentParser, int8: bool = False) -> None:
    p.add_argument("--precision", choices=PRECISIONS if int8 else FLOAT_PRECISIONS, default="auto",
                   help=PRECISION_HELP + (INT8_HELP if int8 else ""))


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", nargs="+", required=True, metavar="PATH",
                   help="one ensemble.json, or model files / checkpoint directories")
    p.add_argument("--tta", default=None,
                   help=f"comma-separated views ({','.join(VIEW_NAMES)}), 'none', or 'default' (the views every model "
                        "saw in training, read from the augmentation config in its model file)")
    p.add_argument("--weights", type=_weights, default=None, help="per-model weights, e.g. 0.6,0.4")
    p.add_argument("--combine", choices=COMBINES, default=None,
                   help="how members are combined (default: the manifest's; weighted with --weights; else mean)")
    add_precision_arg(p, int8=True)
    p.add_argument("--backend", choices=BACKENDS, default="auto", help=BACKEND_HELP)
    p.add_argument("--calibration", default=None, metavar="DATASET",
                   help=f"--precision int8: a dataset directory whose validation split (its first {CALIBRATION_ROWS} "
                        "decodable images) calibrates the quantization")


def cmd_predict(a: argparse.Namespace) -> int:
    from imgcls_dist.predictor.predict import format_predictions, predict_images

    results = predict_images(a.images, a.models, topk=a.topk, tta=a.tta, weights=a.weights, combine=a.combine,
                             precision=a.precision, backend=a.backend, calibration=a.calibration)
    print(format_predictions(results))
    return 0


def register_predict_command(sub) -> None:
    p = sub.add_parser("predict", help="top-k classes of a few image files, in this process (no Ray)")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (local, s3:// or gs://)")
    add_model_args(p)
    p.add_argument("--topk", type=int, default=5, help="classes to print per image (default 5)")
    p.set_defaults(func=cmd_predict)
