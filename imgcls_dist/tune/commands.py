"""CLI subcommand `tune` (registered by cli.py): parse, load the config, run the campaign, say where it is."""

from __future__ import annotations

import argparse

from imgcls_dist.config import add_config_args


def cmd_tune(a: argparse.Namespace) -> int:
    from imgcls_dist.config import load_config

    cfg = load_config(a.config, a.overrides)  # before importing Ray: a typo answers in milliseconds
    from imgcls_dist.tune.campaign import run_campaign

    s = run_campaign(cfg, resume=a.resume, early_stopping=not a.no_early_stopping)
    print(f"campaign directory: {s['campaign_dir']}\n"
          f"  results:  {s['results_csv']}\n"
          f"  best:     {s['best_config']}  (imgcls-dist train --config {s['best_config']})\n"
          f"  ensemble: {s['ensemble']}  (imgcls-dist infer --models {s['ensemble']} --input ... --output ...)\n"
          f"  plots:    {', '.join(s['plots'])}")
    return 0


def register_tune_commands(sub) -> None:
    p = sub.add_parser("tune", help="hyperparameter search with Ray Tune + ASHA; each trial is a Ray Train run")
    add_config_args(p, example="tune.num_samples=4")
    p.add_argument("--resume", action="store_true",
                   help="continue the campaign in <run.storage_path>/<run.name> (finished trials are kept)")
    p.add_argument("--no-early-stopping", action="store_true",
                   help="run every trial to the last epoch (FIFO) instead of ASHA")
    p.set_defaults(func=cmd_tune)
