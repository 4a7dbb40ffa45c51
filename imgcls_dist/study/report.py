"""A finished (or interrupted) study -> trials.csv, study.csv, comparisons.csv, study.md, the plots, and the
same tables on the console. Per-trial numbers come from each trial's study_metrics.json; statuses and errors
from Tune. Statistics: study/stats.py (method stated in the report)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any, Sequence

from imgcls_dist.config import ExperimentConfig
from imgcls_dist.errors import JobFailed, UserError
from imgcls_dist.storage import Location
from imgcls_dist.study.metrics import BY_KEY, METRICS, STUDY_METRICS_FILE
from imgcls_dist.study.spec import Unit, sweep_key, trial_name
from imgcls_dist.study.stats import METHOD, Interval, mean_ci, paired_difference, pareto_front, verdict
from imgcls_dist.table import format_table

TRIALS_CSV, STUDY_CSV, COMPARISONS_CSV, STUDY_MD = "trials.csv", "study.csv", "comparisons.csv", "study.md"
# Compared with the baseline arm, in this order
COMPARED = ("test_acc", "train_clean_acc", "overfit_gap", "best_val_acc", "epochs_to_95pct_best", "wall_s",
            "latency_p50_ms", "model_mb")
# study.md's main table; the console shows the columns that fit a terminal (study.csv has every metric)
SHOWN = ("test_acc", "train_clean_acc", "overfit_gap", "best_val_acc", "epochs_to_95pct_best", "wall_s",
         "images_per_s", "params", "model_mb", "latency_p50_ms", "latency_p95_ms", "peak_rss_mb")
ON_CONSOLE = ("test_acc", "train_clean_acc", "overfit_gap", "epochs_to_95pct_best", "wall_s", "model_mb",
              "latency_p50_ms")
OK = "TERMINATED"


def _read_metrics(trial_dir: Location) -> dict[str, Any] | None:
    try:
        return json.loads((trial_dir / STUDY_METRICS_FILE).read_text())
    except (UserError, json.JSONDecodeError):
        return None


def collect_rows(cfg: ExperimentConfig, study_dir: Location, units: Sequence[Unit], grid) -> list[dict[str, Any]]:
    """One row per unit x seed, in that order: a trial Tune never started is UNFINISHED."""
    from imgcls_dist.tune.campaign import TRIALS_DIR, error_reason
    from imgcls_dist.tune.status import read_statuses

    all_ended = grid.num_terminated + grid.num_errors == len(grid)
    statuses = {} if all_ended else read_statuses(study_dir)
    errors = {Path(res.path).name: error_reason(res.error) for res in grid}
    ran = set(errors)
    rows = []
    for unit in units:
        for seed in cfg.study.seeds:
            name = trial_name(unit.name, seed)
            error = errors.get(name)
            metrics = _read_metrics(study_dir / TRIALS_DIR / name) if error is None else None
            status = ("ERROR" if error else OK if all_ended and name in ran else statuses.get(name, "UNFINISHED"))
            if status == OK and metrics is None:
                status, error = "ERROR", "the trial ended without its study_metrics.json"
            rows.append({"trial": name, "unit": unit.name, "arm": unit.arm, "sweep_value": unit.sweep_value,
                         "seed": seed, "status": status, "error": error, **(metrics or {})})
    return rows


def summarize_units(units: Sequence[Unit], rows: list[dict]) -> list[dict[str, Any]]:
    out = []
    for unit in units:
        mine = [r for r in rows if r["unit"] == unit.name]
        ok = [r for r in mine if r["status"] == OK]
        out.append({"unit": unit.name, "arm": unit.arm, "sweep_value": unit.sweep_value, "n": len(ok),
                    "trials": len(mine), "failed": [r["trial"] for r in mine if r["status"] == "ERROR"],
                    "stats": {m.key: mean_ci([r.get(m.key) for r in ok]) for m in METRICS}})
    return out


def compare_with_baseline(cfg: ExperimentConfig, units: Sequence[Unit], rows: list[dict]) -> list[dict[str, Any]]:
    """Each unit vs the baseline arm's unit at the same sweep value: paired by seed, metric by metric."""
    base = cfg.study.baseline
    if base is None:
        return []
    by_seed = {u.name: {r["seed"]: r for r in rows if r["unit"] == u.name and r["status"] == OK} for u in units}
    out = []
    for unit in units:
        ref = next((u for u in units if u.arm == base and u.sweep_value == unit.sweep_value), None)
        if unit.arm == base or ref is None:
            continue
        for key in COMPARED:
            p = paired_difference({s: r.get(key) for s, r in by_seed[unit.name].items()},
                                  {s: r.get(key) for s, r in by_seed[ref.name].items()})
            out.append({"unit": unit.name, "baseline": ref.name, "metric": key, "n": p.n, "mean_diff": p.mean_diff,
                        "lo": p.lo, "hi": p.hi, "p_value": p.p_value, "verdict": verdict(p, BY_KEY[key].better)})
    return out


def meets_constraints(cfg: ExperimentConfig, unit: dict[str, Any]) -> bool:
    """On the means over seeds; a unit without a number for a constrained metric does not meet it."""
    c, s = cfg.study.constraints, unit["stats"]
    checks = [(c.max_latency_ms, "latency_p50_ms", lambda v, b: v <= b),
              (c.max_model_mb, "model_mb", lambda v, b: v <= b),
              (c.min_test_acc, "test_acc", lambda v, b: v >= b)]
    return unit["n"] > 0 and all(bound is None or (s[key].mean is not None and ok(s[key].mean, bound))
                                 for bound, key, ok in checks)


def fmt_interval(iv: Interval, spec: str) -> str:
    if iv.mean is None:
        return "-"
    if iv.lo is None:
        return format(iv.mean, spec)
    return f"{iv.mean:{spec}} ± {(iv.hi - iv.lo) / 2:{spec}}"


def _n_cell(u: dict[str, Any]) -> str:
    return f"{u['n']}/{u['trials']}" + (f" ({len(u['failed'])} failed)" if u["failed"] else "")


def units_table(units: list[dict[str, Any]], meets: set[str],
                columns: Sequence[str] = SHOWN) -> tuple[list[str], list[list[str]]]:
    header = ["unit", "seeds ok", *(BY_KEY[k].label for k in columns), "meets constraints"]
    body = [[u["unit"], _n_cell(u), *(fmt_interval(u["stats"][k], BY_KEY[k].fmt) for k in columns),
             "yes" if u["unit"] in meets else "no"] for u in units]
    return header, body


def comparisons_table(comparisons: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    header = ["unit", "vs", "metric", "seeds", "difference (95% CI)", "p", "verdict"]
    body = []
    for c in comparisons:
        spec = BY_KEY[c["metric"]].fmt
        diff = "-" if c["mean_diff"] is None else (
            f"{c['mean_diff']:+{spec}}" + ("" if c["lo"] is None else f" [{c['lo']:+{spec}}, {c['hi']:+{spec}}]"))
        p = "-" if c["p_value"] is None else f"{c['p_value']:.3g}"
        body.append([c["unit"], c["baseline"], BY_KEY[c["metric"]].label, str(c["n"]), diff, p, c["verdict"]])
    return header, body


def markdown_table(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in body])


def _csv(columns: Sequence[str], rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({c: "" if r.get(c) is None else r[c] for c in columns})
    return buf.getvalue()


def study_csv(units: list[dict[str, Any]]) -> str:
    flat = []
    for u in units:
        row = {"unit": u["unit"], "arm": u["arm"], "sweep_value": u["sweep_value"], "seeds_ok": u["n"],
               "trials": u["trials"], "failed": " ".join(u["failed"])}
        for m in METRICS:
            iv = u["stats"][m.key]
            row.update({f"{m.key}_mean": iv.mean, f"{m.key}_lo": iv.lo, f"{m.key}_hi": iv.hi})
        flat.append(row)
    cols = ["unit", "arm", "sweep_value", "seeds_ok", "trials", "failed"] + [
        f"{m.key}_{s}" for m in METRICS for s in ("mean", "lo", "hi")]
    return _csv(cols, flat)


def write_markdown(cfg: ExperimentConfig, units, comparisons, rows, meets, fronts, plots) -> str:
    c = cfg.study.constraints
    bounds = [f"{label} {op} {v:g}" for v, label, op in ((c.max_latency_ms, "latency p50 ms", "<="),
                                                         (c.max_model_mb, "model MB", "<="),
                                                         (c.min_test_acc, "test acc", ">="))
              if v is not None]
    failed = [r for r in rows if r["status"] != OK]
    parts = [
        f"# Study {cfg.run.name}",
        f"{len(units)} unit(s) x seeds {cfg.study.seeds}, {cfg.train.epochs} epochs, data {cfg.data.path}"
        + (f", swept {sweep_key(cfg)}" if cfg.study.sweep else "") + ".",
        f"**Method.** {METHOD} Latency: one image from its encoded bytes to probabilities, batch 1, one CPU "
        f"thread, {cfg.study.latency_repeats} timed runs after 3 warm-up runs. Training accuracy (clean): one "
        "pass over the trial's training rows without augmentation; overfit gap = that minus test accuracy.",
        "## Units (mean ± 95% CI half width over seeds)",
        markdown_table(*units_table(units, meets)),
    ]
    if comparisons:
        parts += [f"## Against the baseline ({cfg.study.baseline}), paired by seed",
                  markdown_table(*comparisons_table(comparisons))]
    parts += ["## Deployment constraints",
              ("Bounds: " + ", ".join(bounds) + f". Meeting all of them: {', '.join(sorted(meets)) or 'none'}."
               if bounds else "No constraints given."),
              f"Pareto front, test accuracy vs latency: {', '.join(fronts['latency']) or '-'}; "
              f"vs model size: {', '.join(fronts['size']) or '-'}."]
    if failed:
        parts += ["## Trials without results",
                  markdown_table(["trial", "status", "error"], [[r["trial"], r["status"], r["error"] or ""]
                                                                  for r in failed])]
    parts += ["## Plots", *(f"![{p.name}]({p.name})" for p in plots)]
    return "\n\n".join(parts) + "\n"


def finalize_study(cfg: ExperimentConfig, study_dir: Location, units: Sequence[Unit], grid, *,
                   wall_s: float) -> dict[str, Any]:
    from imgcls_dist.study.plots import write_plots

    rows = collect_rows(cfg, study_dir, units, grid)
    summaries = summarize_units(units, rows)
    comparisons = compare_with_baseline(cfg, units, rows)
    meets = {u["unit"] for u in summaries if meets_constraints(cfg, u)}
    fronts = {axis: pareto_front([(u["unit"], u["stats"][key].mean, u["stats"]["test_acc"].mean)
                                  for u in summaries if u["n"]])
              for axis, key in (("latency", "latency_p50_ms"), ("size", "model_mb"))}
    trial_cols = ["trial", "unit", "arm", "sweep_value", "seed", "status", "error", *(m.key for m in METRICS)]
    (study_dir / TRIALS_CSV).write_text(_csv(trial_cols, rows))
    (study_dir / STUDY_CSV).write_text(study_csv(summaries))
    (study_dir / COMPARISONS_CSV).write_text(_csv(
        ["unit", "baseline", "metric", "n", "mean_diff", "lo", "hi", "p_value", "verdict"], comparisons))
    plots = write_plots(rows, summaries, sweep_key=sweep_key(cfg), constraints=cfg.study.constraints.model_dump(),
                        meets=meets, front_latency=fronts["latency"], front_size=fronts["size"], out_dir=study_dir)
    (study_dir / STUDY_MD).write_text(write_markdown(cfg, summaries, comparisons, rows, meets, fronts, plots))
    print("\n" + format_table(*units_table(summaries, meets, ON_CONSOLE)), flush=True)
    if comparisons:
        acc = [c for c in comparisons if c["metric"] == "test_acc"]
        print(f"\nvs the baseline ({cfg.study.baseline}), test accuracy:\n" + format_table(*comparisons_table(acc)),
              flush=True)
    unfinished = [r["trial"] for r in rows if r["status"] == "UNFINISHED"]
    if unfinished:
        print(f"{len(unfinished)} trial(s) did not finish ({', '.join(unfinished)}): continue with --resume",
              flush=True)
    errored = [r for r in rows if r["status"] == "ERROR"]
    for r in errored:
        print(f"trial {r['trial']} failed: {r['error']}", flush=True)
    print(f"\n{len(rows)} trials ({len(errored)} failed) in {wall_s:.0f}s; report: {study_dir / STUDY_MD}",
          flush=True)
    if rows and len(errored) == len(rows):
        raise JobFailed(f"all {len(rows)} trials failed (report: {study_dir / STUDY_MD}); first error: "
                        f"{errored[0]['error']}")
    return {"study_dir": study_dir.uri, "report": (study_dir / STUDY_MD).uri, "rows": rows, "units": summaries,
            "comparisons": comparisons, "meets": sorted(meets), "fronts": fronts, "plots": [p.uri for p in plots],
            "wall_s": round(wall_s, 2)}
