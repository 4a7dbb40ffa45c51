"""What ASHA saves: the same search (same seed, same sampled configs) with ASHA and run to completion (FIFO).

Cost is counted in trial-epochs actually trained (every epoch in each trial's Train history, including
an epoch a stopped trial finished before its stop took effect); quality is each search's best
validation accuracy. Wall time is reported too, but on a shared machine it is the noisier number.

    python -m benchmarks tune --config configs/tune_digits.yaml [--set k=v ...]
"""

from __future__ import annotations

from typing import Any

from imgcls_dist.config import ExperimentConfig, build_config
from imgcls_dist.table import format_table


def _variant(cfg: ExperimentConfig, suffix: str) -> ExperimentConfig:
    raw = cfg.to_dict()
    raw["run"]["name"] = f"{cfg.run.name}_{suffix}"
    return build_config(raw, source=f"{cfg.run.name} ({suffix})")


def measure_asha_saving(cfg: ExperimentConfig) -> dict[str, Any]:
    """Run the campaign twice (`<run.name>_asha`, `<run.name>_fifo`); print a table; return the numbers."""
    from imgcls_dist.tune.campaign import run_campaign

    keys = list(cfg.tune.space)
    out: dict[str, Any] = {}
    configs = {}
    for mode, early in (("asha", True), ("fifo", False)):
        s = run_campaign(_variant(cfg, mode), early_stopping=early)
        out[mode] = {"campaign_dir": s["campaign_dir"], "trials": s["num_trials"], "trial_epochs": s["trial_epochs"],
                     "stopped_early": s["stopped_early"], "errored": s["errored"], "best_val_acc": s["best_val_acc"],
                     "best_trial": s["best_trial"], "wall_s": s["wall_s"]}
        configs[mode] = sorted(tuple(repr(r[k]) for k in keys) for r in s["rows"])
    a, f = out["asha"], out["fifo"]
    out["epoch_ratio"] = a["trial_epochs"] / f["trial_epochs"] if f["trial_epochs"] else float("nan")
    out["wall_ratio"] = a["wall_s"] / f["wall_s"] if f["wall_s"] else float("nan")
    out["best_val_acc_delta"] = a["best_val_acc"] - f["best_val_acc"]
    out["same_configs"] = configs["asha"] == configs["fifo"]
    print("\n" + format_saving_table(out), flush=True)
    return out


def format_saving_table(r: dict[str, Any]) -> str:
    header = ("search", "trials", "stopped early", "trial-epochs", "best val_acc", "wall s")
    rows = []
    for mode in ("asha", "fifo"):
        m = r[mode]
        rows.append((mode.upper(), str(m["trials"]), str(m["stopped_early"]), str(m["trial_epochs"]),
                     f"{m['best_val_acc']:.4f}", f"{m['wall_s']:.0f}"))
    lines = [format_table(header, rows)]
    lines.append(f"ASHA / FIFO: {r['epoch_ratio']:.2f}x the trial-epochs ({1 - r['epoch_ratio']:.0%} saved), "
                 f"{r['wall_ratio']:.2f}x the wall time, best val_acc {r['best_val_acc_delta']:+.4f}"
                 + ("" if r["same_configs"] else "  (WARNING: the two searches sampled different configs)"))
    return "\n".join(lines)
