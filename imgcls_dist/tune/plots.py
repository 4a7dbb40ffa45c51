"""Campaign plots: validation accuracy against the searched knobs, and every trial's learning curve."""

from __future__ import annotations

from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: clusters and CI have no display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from imgcls_dist.evaluate.plots import save_figure  # noqa: E402
from imgcls_dist.storage import Location, PathLike  # noqa: E402


def _ok(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r.get("best_val_acc") is not None]


def plot_metric_vs_param(rows: list[dict[str, Any]], key: str, path: PathLike, *, color_key: str | None = None,
                         logx: bool = False, searched: bool = True, title: str | None = None) -> Location:
    """Best val_acc of each trial against one searched value; color = another (categorical) one.

    Hollow markers are trials ASHA stopped early (their accuracy is from fewer epochs)."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ok = [r for r in _ok(rows) if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)]
    groups: dict[str, list[dict]] = {}
    for r in ok:
        groups.setdefault(str(r.get(color_key)) if color_key else "trials", []).append(r)
    cmap = plt.get_cmap("tab10")
    for i, (g, rs) in enumerate(sorted(groups.items())):
        c = cmap(i % 10)
        full = [r for r in rs if not r.get("stopped_early")]
        early = [r for r in rs if r.get("stopped_early")]
        if full:
            ax.scatter([r[key] for r in full], [r["best_val_acc"] for r in full], color=c, s=45, label=g, zorder=3)
        if early:
            ax.scatter([r[key] for r in early], [r["best_val_acc"] for r in early], facecolors="none",
                       edgecolors=c, s=45, zorder=3, label=None if full else g)
    if logx and ok and all(r[key] > 0 for r in ok):
        ax.set_xscale("log")
    ax.set(xlabel=key + ("" if searched else " (not searched)"), ylabel="best val_acc",
           title=title or f"val_acc vs {key}" + (" (hollow: stopped early by ASHA)" if any(r.get("stopped_early")
                                                                                       for r in ok) else ""))
    if groups:
        ax.legend(title=color_key, fontsize=8, title_fontsize=8, loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_trial_curves(curves: dict[str, list[float]], stopped_at: dict[str, int | None], path: PathLike, *,
                      max_epochs: int, rungs: list[int] | None = None) -> Location:
    """val_acc per epoch of every trial; an x marks the epoch at which ASHA stopped a trial (epochs
    after it are ones the trial finished while the stop reached it), dotted lines are ASHA's rungs."""
    fig, ax = plt.subplots(figsize=(8, 5))
    cmap = plt.get_cmap("tab20")
    for i, (name, accs) in enumerate(sorted(curves.items())):
        if not accs:
            continue
        c = cmap(i % 20)
        xs = list(range(1, len(accs) + 1))
        ax.plot(xs, accs, ".-", color=c, lw=1.4, ms=4, alpha=0.9, label=name)
        at = stopped_at.get(name)
        if at:
            at = min(at, len(accs))
            ax.plot(at, accs[at - 1], "x", color=c, ms=9, mew=2)
        else:
            ax.plot(xs[-1], accs[-1], "o", color=c, ms=4)
    for r in rungs or []:
        ax.axvline(r, color="gray", ls=":", lw=1)
    ax.set(xlabel="epoch", ylabel="val_acc", xlim=(0.8, max_epochs + 0.2),
           title="trial learning curves (x: stopped early by ASHA, dotted: ASHA rungs)" if rungs
           else "trial learning curves")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    if len(curves) <= 20:
        ax.legend(fontsize=7, ncol=2, loc="lower right")
    fig.tight_layout()
    return save_figure(fig, path)
