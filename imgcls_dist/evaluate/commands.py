"""CLI subcommand `evaluate`: parse and call `evaluate.report.evaluate_predictions`."""

from __future__ import annotations

import argparse

from imgcls_dist.evaluate.files import COMPARISON_CSV, CONFUSION_PLOT, METRICS_JSON, RELIABILITY_PLOT, REPORT_TXT
from imgcls_dist.tracking.reports import add_mlflow_run_arg, log_report, preflight

# What `--mlflow-run` logs: the report's numbers (metrics.json has them all) and the files this run wrote.
LOGGED_METRICS = ("accuracy", "balanced_accuracy", "evaluated_rows", "error_rows", "unlabeled_rows")
REPORT_FILES = (REPORT_TXT, CONFUSION_PLOT, METRICS_JSON)


def cmd_evaluate(a: argparse.Namespace) -> int:
    from imgcls_dist.evaluate.report import evaluate_predictions, parse_compare
    from imgcls_dist.storage import location

    run = preflight(a.mlflow_run, "evaluate")
    compare = parse_compare(a.compare)
    result = evaluate_predictions(a.out, classes_file=a.classes, compare=compare, report_dir=a.report_dir,
                                  name=a.name)
    names = REPORT_FILES + ((COMPARISON_CSV, RELIABILITY_PLOT) if compare else ())
    log_report(run, "evaluate", [location(result["report_dir"]) / n for n in names],
               {k: result[k] for k in LOGGED_METRICS})
    return 0


def register_evaluate_command(sub) -> None:
    p = sub.add_parser("evaluate", help="accuracy, per-class report and confusion matrix of a predictions directory")
    p.add_argument("out", metavar="OUT", help="predictions directory written by infer")
    p.add_argument("--classes", default=None, help="dataset.json (or dataset dir) to take class names from")
    p.add_argument("--compare", nargs="*", default=[], metavar="NAME=OUT",
                   help="other prediction sets to compare accuracy with (e.g. single models, no TTA)")
    p.add_argument("--name", default=None, help="name of OUT in the comparison table (default: its directory name)")
    p.add_argument("--report-dir", default=None, help="where report files go (default OUT/eval)")
    add_mlflow_run_arg(p)
    p.set_defaults(func=cmd_evaluate)
