"""CLI subcommand `register`: parse and call `register.package.register_model`."""

from __future__ import annotations

import argparse


def cmd_register(a: argparse.Namespace) -> int:
    from imgcls_dist.register.package import register_model

    number = register_model(a.models, a.name, a.alias)
    print(f"registered {a.name} version {number} (models:/{a.name}/{number})"
          + (f", alias {a.alias} (models:/{a.name}@{a.alias})" if a.alias else ""))
    return 0


def register_register_command(sub) -> None:
    p = sub.add_parser(
        "register", help="a model file, ensemble.json or exported .onnx as a new version of an MLflow registered model",
        description="Log a model file (or run directory) or an ensemble.json with its members as an MLflow model "
                    "(image bytes in, class probabilities out) and register it as a new version of NAME on the "
                    "server of MLFLOW_TRACKING_URI. infer, predict and serve then take models:/NAME/VERSION or "
                    "models:/NAME@ALIAS as --models. An .onnx file from `imgcls-dist export` is registered as "
                    "MLflow's onnx flavor instead (uint8 images in, probabilities out), for onnxruntime and "
                    "mlflow.pyfunc, not for infer, predict or serve. Needs: pip install 'imgcls-dist[mlflow]'.")
    p.add_argument("--models", nargs="+", required=True, metavar="PATH",
                   help="one model file or run directory, one ensemble.json, several model files (a plain mean), or "
                        "one .onnx file written by `imgcls-dist export`")
    p.add_argument("--name", required=True, help="the registered model's name (made on first use)")
    p.add_argument("--alias", default=None, help="also point this alias (e.g. champion) at the new version")
    p.set_defaults(func=cmd_register)
