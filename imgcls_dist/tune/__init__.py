"""Ray Tune campaigns: each trial is a Ray Train run; ASHA early stopping; results + ensemble manifest.

space.py        tune.space (YAML) -> Ray Tune search space, validated; a sample -> the trial's config
campaign.py     run_campaign(cfg, resume=, early_stopping=) -> summary dict (the `tune` command)
trial.py        what runs inside one trial: the Train run, relayed per epoch
status.py       each trial's final status, recorded by a Tune callback (survives --resume)
report.py       the Train -> Tune relay of every epoch's report (ASHA's time axis)
results.py      results.csv / table, best.yaml, ensemble.json (+ models/<trial>/model.pt)
plots.py        val_acc vs lr / augmentation strength, per-trial learning curves
commands.py     the `imgcls-dist tune` argparse subcommand
"""
