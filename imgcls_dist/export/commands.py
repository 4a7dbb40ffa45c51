"""CLI subcommand `export`: parse and call `export.onnx_export.export_onnx` (torch is imported only when it runs)."""

from __future__ import annotations

import argparse
import sys


def cmd_export(a: argparse.Namespace) -> int:
    from imgcls_dist.export.onnx_export import export_onnx, format_result, views_note

    result = export_onnx(a.models, out=a.out, fmt=a.format)
    print(format_result(result))
    print(views_note(result), file=sys.stderr)  # notes go to stderr, as the other verbs' do
    return 0


def register_export_command(sub) -> None:
    p = sub.add_parser(
        "export", help="a model file or ensemble.json as one ONNX file (uint8 images in, probabilities out)",
        description="Export a model file, a run directory holding model.pt, or an ensemble.json to ONNX. The "
                    "graph takes uint8 NCHW images at the model's size and channels (normalization inside) "
                    "and returns class probabilities; the batch axis is dynamic. Each file is checked in ONNX "
                    "Runtime against the PyTorch predictor before the command succeeds. TTA views are not "
                    "exported. Needs: pip install 'imgcls-dist[onnx]'.")
    p.add_argument("--models", nargs="+", required=True, metavar="PATH",
                   help="one model file, run directory (with model.pt) or ensemble.json")
    p.add_argument("--format", default="onnx", help="output format: onnx (the only one; default)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="directory for NAME.onnx (default: beside the input; NAME is the run directory's or "
                        "the file's name)")
    p.set_defaults(func=cmd_export)
