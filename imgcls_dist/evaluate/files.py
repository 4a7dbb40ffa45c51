"""Names of the report files an evaluation writes (beside a run, or in a prediction set's report directory): one
place for the writers and for what copies them elsewhere (an MLflow run's artifacts)."""

REPORT_TXT = "classification_report.txt"
CONFUSION_PLOT = "confusion_matrix.png"
METRICS_JSON = "metrics.json"
COMPARISON_CSV = "comparison.csv"  # with --compare: the other prediction sets, side by side
RELIABILITY_PLOT = "reliability.png"  # with --compare: each set's calibration
