"""Study plots: what each unit's schedule and learning looked like, and where the units sit on accuracy against
training-set size, cost and the deployment constraints.

Inputs are plain data (one dict per trial, one per unit with `stats.Interval`s), so everything here is testable
without Ray. Every function returns the PNG it wrote, or None and writes nothing when it has nothing to draw."""

from __future__ import annotations

import math
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: clusters and CI have no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from imgcls_dist.evaluate.plots import save_figure  # noqa: E402
from imgcls_dist.storage import Location, PathLike, location  # noqa: E402

FILES = {
    "lr": "lr_schedules.png",
    "val": "val_curves.png",
    "train_vs_test": "train_vs_test.png",
    "size": "accuracy_vs_train_size.png",
    "efficiency": "efficiency.png",
    "pareto": "pareto.png",
}


def _color(i: int, n: int):
    cmap = plt.get_cmap("tab10" if n <= 10 else "tab20")
    return cmap(i % cmap.N)


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _by_unit(rows: list[dict]) -> dict[str, list[dict]]:
    """Trials grouped by unit, units in the order they first appear (the order the study lists them)."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(str(r["unit"]), []).append(r)
    return groups


def _interval(unit: dict, key: str):
    return (unit.get("stats") or {}).get(key)


def _mean(unit: dict, key: str) -> float | None:
    ci = _interval(unit, key)
    return ci.mean if ci is not None and _finite(ci.mean) else None


def _err(unit: dict, key: str) -> tuple[float, float]:
    """Distances from the mean to the interval's ends; (0, 0) when the unit had too few seeds for one."""
    ci = _interval(unit, key)
    if ci is None or ci.mean is None or ci.lo is None or ci.hi is None:
        return 0.0, 0.0
    return ci.mean - ci.lo, ci.hi - ci.mean


def _wants_log(values: list[float]) -> bool:
    """Log only where it reveals something: every value positive and spanning more than a factor of 10."""
    return bool(values) and min(values) > 0 and max(values) > 10 * min(values)


# ------------------------------------------------------------------------------------------- per-trial curves
def plot_lr_schedules(rows: list[dict], out: PathLike) -> Location | None:
    """Every trial's schedule, one colour per unit: seeds overlap exactly unless the schedule follows the
    run (ReduceLROnPlateau reacts to each run's own validation loss)."""
    curves: dict[str, list[list[float]]] = {}
    for unit, rs in _by_unit(rows).items():
        logged = [[float(v) for v in r["lr_curve"]] for r in sorted(rs, key=lambda r: r["seed"]) if r.get("lr_curve")]
        if logged:
            curves[unit] = logged
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, (unit, runs) in enumerate(curves.items()):
        for k, lrs in enumerate(runs):
            ax.plot(range(1, len(lrs) + 1), lrs, lw=1.4, alpha=0.8, color=_color(i, len(curves)),
                    label=f"{unit} ({len(runs)} seed{'s' if len(runs) > 1 else ''})" if k == 0 else None)
    if _wants_log([v for runs in curves.values() for lrs in runs for v in lrs]):
        ax.set_yscale("log")
    ax.set(xlabel="optimizer step", ylabel="learning rate", title="learning-rate schedule per unit")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2 if len(curves) > 8 else 1, loc="best")
    fig.tight_layout()
    return save_figure(fig, out)


def _epoch_matrix(curves: list[list[float]]) -> np.ndarray:
    """Seeds x epochs, NaN past a seed's last epoch: a trial that stopped early still counts where it ran."""
    width = max(len(c) for c in curves)
    m = np.full((len(curves), width), np.nan)
    for i, c in enumerate(curves):
        m[i, :len(c)] = [np.nan if v is None else float(v) for v in c]
    return m


def plot_val_curves(rows: list[dict], out: PathLike) -> Location | None:
    """Mean validation accuracy per epoch over a unit's seeds; the band is the seeds' min..max."""
    units = {u: [r["val_curve"] for r in rs if r.get("val_curve")] for u, rs in _by_unit(rows).items()}
    units = {u: cs for u, cs in units.items() if cs}
    if not units:
        return None
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, (unit, curves) in enumerate(units.items()):
        m = _epoch_matrix(curves)
        keep = ~np.all(np.isnan(m), axis=0)
        epochs = np.arange(1, m.shape[1] + 1)[keep]
        m = m[:, keep]
        c = _color(i, len(units))
        ax.plot(epochs, np.nanmean(m, axis=0), ".-", color=c, lw=1.4, ms=4, label=f"{unit} ({len(curves)} seeds)")
        if len(curves) > 1:
            ax.fill_between(epochs, np.nanmin(m, axis=0), np.nanmax(m, axis=0), color=c, alpha=0.18, lw=0)
    ax.set(xlabel="epoch", ylabel="val acc", title="validation accuracy: mean over seeds, band = min..max")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2 if len(units) > 8 else 1, loc="lower right")
    fig.tight_layout()
    return save_figure(fig, out)


# ------------------------------------------------------------------------------------------- per-unit summaries
def _bars(ax, xs: np.ndarray, units: list[dict], key: str, label: str, color) -> None:
    """Bars at the unit means; a unit without the metric gets no bar, one without an interval no error bar."""
    for x, u in zip(xs, units):
        mean = _mean(u, key)
        if mean is None:
            continue
        ax.bar(x, mean, width=0.38, color=color, label=label)
        label = None
        if _err(u, key) != (0.0, 0.0):
            lo, hi = _err(u, key)
            ax.errorbar(x, mean, yerr=[[lo], [hi]], fmt="none", ecolor="black", capsize=3, lw=1)


def plot_train_vs_test(units: list[dict], out: PathLike) -> Location | None:
    """Accuracy on the training rows (clean, no augmentation) beside test accuracy: the gap is overfitting."""
    units = [u for u in units if _mean(u, "train_clean_acc") is not None or _mean(u, "test_acc") is not None]
    if not units:
        return None
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(units) + 2), 4.5))
    xs = np.arange(len(units), dtype=float)
    _bars(ax, xs - 0.2, units, "train_clean_acc", "train acc (clean)", "tab:blue")
    _bars(ax, xs + 0.2, units, "test_acc", "test acc", "tab:orange")
    crowded = len(units) > 4
    ax.set_xticks(xs, [u["unit"] for u in units], rotation=30 if crowded else 0, ha="right" if crowded else "center",
                  fontsize=8)
    ax.set(ylabel="accuracy", title="train vs test accuracy (mean, 95% CI): the gap is overfitting")
    ax.set_ylim(0, ax.get_ylim()[1] * 1.15)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", ncol=2)
    fig.tight_layout()
    return save_figure(fig, out)


def _sweep_number(v: Any) -> float | None:
    if _finite(v):
        return float(v)
    try:
        return float(v) if isinstance(v, str) and math.isfinite(float(v)) else None
    except ValueError:
        return None


def _is_all(v: Any) -> bool:
    return v is None or (isinstance(v, str) and v.lower() == "all")


def plot_accuracy_vs_size(units: list[dict], sweep_key: str | None, out: PathLike) -> Location | None:
    """Test accuracy per arm against the swept training-set size; the full set ('all', or no sweep value) sits
    at twice the largest size so it reads as the right end of the same axis."""
    if not sweep_key:
        return None
    numeric = [n for u in units if (n := _sweep_number(u.get("sweep_value"))) is not None]
    if not numeric:
        return None
    all_x = max(numeric) * 2
    arms: dict[str, list[tuple[float, dict]]] = {}
    for u in units:
        v = u.get("sweep_value")
        x = all_x if _is_all(v) else _sweep_number(v)
        if x is not None and _mean(u, "test_acc") is not None:
            arms.setdefault(str(u["arm"]), []).append((x, u))
    if not arms:
        return None
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, (arm, pts) in enumerate(arms.items()):
        pts.sort(key=lambda p: p[0])
        xs = np.array([x for x, _ in pts])
        ci = [_interval(u, "test_acc") for _, u in pts]
        c = _color(i, len(arms))
        ax.plot(xs, [x.mean for x in ci], "o-", color=c, lw=1.6, label=arm)
        lo = np.array([np.nan if x.lo is None else x.lo for x in ci])
        hi = np.array([np.nan if x.hi is None else x.hi for x in ci])
        if not np.all(np.isnan(lo)):
            ax.fill_between(xs, lo, hi, color=c, alpha=0.18, lw=0)
    ticks = sorted(set(numeric) | ({all_x} if any(_is_all(u.get("sweep_value")) for u in units) else set()))
    if _wants_log(ticks):
        ax.set_xscale("log")
    ax.minorticks_off()
    ax.set_xticks(ticks, ["all" if t == all_x else f"{t:g}" for t in ticks])
    ax.set(xlabel=sweep_key, ylabel="test acc", title=f"test accuracy vs {sweep_key} (mean, band = 95% CI)")
    ax.grid(alpha=0.3)
    ax.legend(title="arm", fontsize=8, title_fontsize=8, loc="lower right")
    fig.tight_layout()
    return save_figure(fig, out)


def _scatter_units(ax, units: list[dict], xkey: str, *, marker_for=None, color="tab:blue") -> list[dict]:
    """Units at (mean x, mean test acc) with both intervals as error bars, each labelled; returns those drawn."""
    drawn = [u for u in units if _mean(u, xkey) is not None and _mean(u, "test_acc") is not None]
    for u in drawn:
        x, y = _mean(u, xkey), _mean(u, "test_acc")
        xe, ye = _err(u, xkey), _err(u, "test_acc")
        marker = marker_for(u) if marker_for else "o"
        ax.errorbar(x, y, xerr=[[xe[0]], [xe[1]]], yerr=[[ye[0]], [ye[1]]], fmt=marker, color=color,
                    ecolor="gray", elinewidth=0.8, capsize=2, ms=9 if marker == "*" else 6, zorder=3)
        ax.annotate(u["unit"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    return drawn


def _no_data(ax, what: str) -> None:
    ax.text(0.5, 0.5, f"no unit measured {what}", ha="center", va="center", transform=ax.transAxes, color="gray")


def plot_efficiency(units: list[dict], out: PathLike) -> Location | None:
    """What the accuracy cost: against model size in parameters and against training wall time."""
    panels = (("params", "params", True), ("wall_s", "train wall s", False))
    if not any(_mean(u, k) is not None and _mean(u, "test_acc") is not None for u in units for k, _, _ in panels):
        return None
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for ax, (key, label, logx) in zip(axes, panels):
        drawn = _scatter_units(ax, units, key)
        if not drawn:
            _no_data(ax, label)
        elif logx and all(_mean(u, key) > 0 for u in drawn):
            ax.set_xscale("log")
        ax.set(xlabel=label + (" (log)" if ax.get_xscale() == "log" else ""), ylabel="test acc",
               title=f"test acc vs {label}")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, out)


# ------------------------------------------------------------------------------------------- constraints
def _shade_allowed(ax, max_x: float | None, min_y: float | None) -> bool:
    """Shade x <= max_x, y >= min_y; a missing bound runs to the axis edge. Bound lines are drawn first so
    the view includes them, and the view is then held so the shading cannot widen it."""
    if max_x is None and min_y is None:
        return False
    if max_x is not None:
        ax.axvline(max_x, color="tab:green", ls="--", lw=1)
    if min_y is not None:
        ax.axhline(min_y, color="tab:green", ls="--", lw=1)
    (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
    right = x1 if max_x is None else min(max_x, x1)
    bottom = y0 if min_y is None else max(min_y, y0)
    if right > x0 and y1 > bottom:
        ax.fill_between([x0, right], bottom, y1, color="tab:green", alpha=0.10, lw=0, label="meets constraints",
                        zorder=0)
    ax.set_xlim(x0, x1)
    ax.set_ylim(y0, y1)
    return True


def _front_line(ax, units: list[dict], front: list[str], xkey: str) -> None:
    """The front as a staircase: from each front point, accuracy holds until the next cheaper-to-better step."""
    by_name = {u["unit"]: u for u in units}
    pts = sorted((_mean(by_name[n], xkey), _mean(by_name[n], "test_acc")) for n in front if n in by_name
                 and _mean(by_name[n], xkey) is not None and _mean(by_name[n], "test_acc") is not None)
    if pts:
        ax.step([p[0] for p in pts], [p[1] for p in pts], where="post", color="tab:red", lw=1.5, zorder=2,
                label="Pareto front")


def plot_pareto(units: list[dict], constraints: dict, meets: set[str], front_latency: list[str],
                front_size: list[str], out: PathLike) -> Location | None:
    """Accuracy against the two deployment costs, with the region every constraint allows shaded and the
    units that meet all of them starred: the candidates to ship are the starred points on the front."""
    panels = (("latency_p50_ms", "latency p50 ms", "max_latency_ms", front_latency),
              ("model_mb", "model MB", "max_model_mb", front_size))
    if not any(_mean(u, k) is not None and _mean(u, "test_acc") is not None for u in units for k, *_ in panels):
        return None
    min_acc = constraints.get("min_test_acc")
    constrained = any(constraints.get(k) is not None for k in ("max_latency_ms", "max_model_mb", "min_test_acc"))
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for ax, (key, label, bound, front) in zip(axes, panels):
        drawn = _scatter_units(ax, units, key, marker_for=lambda u: "*" if u["unit"] in meets else "o")
        if not drawn:
            _no_data(ax, label)
            ax.set(xlabel=label, ylabel="test acc")
            continue
        _front_line(ax, units, front, key)
        _shade_allowed(ax, constraints.get(bound), min_acc)
        _legend_markers(ax, drawn, meets, constrained)
        ax.set(xlabel=label, ylabel="test acc", title=f"test acc vs {label}")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, out)


def _legend_markers(ax, drawn: list[dict], meets: set[str], constrained: bool) -> None:
    """Proxy entries for the two markers, since the points themselves are drawn one call per unit."""
    if any(u["unit"] in meets for u in drawn):
        ax.plot([], [], "*", color="tab:blue", ms=9, ls="none", label="meets every constraint")
    if any(u["unit"] not in meets for u in drawn):
        ax.plot([], [], "o", color="tab:blue", ls="none", label="misses a constraint" if constrained else "unit")
    ax.legend(fontsize=8, loc="lower right")

# ------------------------------------------------------------------------------------------- all of them
def write_plots(rows: list[dict], units: list[dict], *, sweep_key: str | None, constraints: dict,
                meets: set[str], front_latency: list[str], front_size: list[str], out_dir: PathLike) -> list[Location]:
    """Every study plot into `out_dir`; returns the files written (a plot with nothing to draw is skipped)."""
    d = location(out_dir)
    written = [
        plot_lr_schedules(rows, d / FILES["lr"]),
        plot_val_curves(rows, d / FILES["val"]),
        plot_train_vs_test(units, d / FILES["train_vs_test"]),
        plot_accuracy_vs_size(units, sweep_key, d / FILES["size"]),
        plot_efficiency(units, d / FILES["efficiency"]),
        plot_pareto(units, constraints, meets, front_latency, front_size, d / FILES["pareto"]),
    ]
    return [w for w in written if w is not None]
