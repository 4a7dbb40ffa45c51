"""CLI subcommand `evaluate`: parse and call `evaluate.report.evaluate_predictions`."""

from __future__ import annotations

import argparse


def cmd_evaluate(a: argparse.Namespace) -> int:
    from imgcls_dist.evaluate.report import evaluate_predictions, parse_compare

    evaluate_predictions(a.out, classes_file=a.classes, compare=parse_compare(a.compare), report_dir=a.report_dir,
                         name=a.name)
    return 0


def register_evaluate_command(sub) -> None:
    p = sub.add_parser("evaluate", help="accuracy, per-class report and confusion matrix of a predictions directory")
    p.add_argument("out", metavar="OUT", help="predictions directory written by infer")
    p.add_argument("--classes", default=None, help="dataset.json (or dataset dir) to take class names from")
    p.add_argument("--compare", nargs="*", default=[], metavar="NAME=OUT",
                   help="other prediction sets to compare accuracy with (e.g. single models, no TTA)")
    p.add_argument("--name", default=None, help="name of OUT in the comparison table (default: its directory name)")
    p.add_argument("--report-dir", default=None, help="where report files go (default OUT/eval)")
    p.set_defaults(func=cmd_evaluate)
