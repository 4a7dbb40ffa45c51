"""CLI subcommand `study` (registered by cli.py): load the config, run or resume the study, say where it is."""

from __future__ import annotations

import argparse

from imgcls_dist.config import add_config_args


def cmd_study(a: argparse.Namespace) -> int:
    from imgcls_dist.config import load_config

    cfg = load_config(a.config, a.overrides)  # before importing Ray: a typo answers in milliseconds
    from imgcls_dist.study.runner import run_study

    s = run_study(cfg, resume=a.resume)
    print(f"study directory: {s['study_dir']}\n  report: {s['report']}\n  plots:  {', '.join(s['plots'])}")
    return 0


def register_study_command(sub) -> None:
    p = sub.add_parser("study", help="compare config arms over repeated seeds: means, confidence intervals, "
                                     "paired verdicts against a baseline, Pareto fronts")
    add_config_args(p, example="study.seeds=[0,1,2,3,4]")
    p.add_argument("--resume", action="store_true",
                   help="continue the study in <run.storage_path>/<run.name> (finished trials are kept)")
    p.set_defaults(func=cmd_study)
