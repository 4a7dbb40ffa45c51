"""Studies: config arms compared over repeated seeds, as a Ray Tune grid of Ray Train runs.

spec.py      the `study` section -> units (arm x sweep value) and trial names, validated before any Ray work
trial.py     what runs inside one trial: the Train run, its artifacts, then the study's measurements
measure.py   clean training accuracy, single-image latency, parameters, steps to converge, LR per step
metrics.py   the metrics every trial records and which direction is better
stats.py     means with t intervals, paired differences and verdicts, Pareto fronts
report.py    trials.csv, study.csv, comparisons.csv, study.md and the console tables
plots.py     LR schedules, val curves, train-vs-test, accuracy vs training size, efficiency, Pareto
runner.py    run_study(cfg, resume=) (the `study` command)
commands.py  the `imgcls-dist study` argparse subcommand
"""
