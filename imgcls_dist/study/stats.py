"""The statistics a study reports: a mean with its confidence interval over seeds, the paired difference of an
arm against the baseline, the verdict that difference supports, and the Pareto front of cost against accuracy.

Seeds are few (often 2 to 5), so intervals use Student's t rather than a normal approximation, and arms are
compared pairwise over the seeds both ran: the same seed gives both the same initialisation and data subset,
so the paired difference removes that shared noise."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats as sps

METHOD = ("Mean over seeds with a two-sided 95 % Student-t confidence interval; each arm vs the baseline as the "
          "paired difference over the seeds both ran (same training and subset seed), with its t interval and a "
          "two-sided paired t-test; 'better'/'worse' when the whole interval lies on one side of zero.")

NEEDS_SEEDS = "needs 2 or more paired seeds"


@dataclass(frozen=True)
class Interval:
    n: int
    mean: float | None
    sd: float | None
    lo: float | None
    hi: float | None


@dataclass(frozen=True)
class Paired:
    n: int
    mean_diff: float | None
    lo: float | None
    hi: float | None
    p_value: float | None


def _usable(v: float | None) -> bool:
    """A trial that failed or never measured a metric reports None (or NaN); neither is a sample."""
    return v is not None and math.isfinite(float(v))


def _t_interval(xs: np.ndarray, confidence: float) -> tuple[float, float, float]:
    """(sd, lo, hi) of the mean of `xs` (at least 2 values); an sd of 0 gives a point, not a NaN width."""
    sd = float(np.std(xs, ddof=1))
    mean = float(np.mean(xs))
    if sd == 0.0:
        return 0.0, mean, mean
    half = float(sps.t.ppf((1.0 + confidence) / 2.0, len(xs) - 1)) * sd / math.sqrt(len(xs))
    return sd, mean - half, mean + half


def mean_ci(values: Sequence[float | None], confidence: float = 0.95) -> Interval:
    """Mean of the usable values with a Student-t interval; one value has a mean but no spread to estimate."""
    xs = np.array([float(v) for v in values if _usable(v)], dtype=float)
    if len(xs) == 0:
        return Interval(0, None, None, None, None)
    if len(xs) == 1:
        return Interval(1, float(xs[0]), None, None, None)
    sd, lo, hi = _t_interval(xs, confidence)
    return Interval(len(xs), float(np.mean(xs)), sd, lo, hi)


def _p_value(a: np.ndarray, b: np.ndarray, diffs: np.ndarray) -> float:
    """ttest_rel divides by the sd of the differences, so a constant difference is decided here instead:
    exactly zero is no evidence at all, any other constant shift is as certain as the data can be."""
    if np.all(diffs == diffs[0]):
        return 1.0 if diffs[0] == 0 else 0.0
    return float(sps.ttest_rel(a, b).pvalue)


def paired_difference(a: Mapping[int, float | None], b: Mapping[int, float | None],
                      confidence: float = 0.95) -> Paired:
    """a - b over the seeds both measured; a seed only one side ran has nothing to be paired with."""
    seeds = sorted(s for s in a if s in b and _usable(a[s]) and _usable(b[s]))
    av = np.array([float(a[s]) for s in seeds], dtype=float)
    bv = np.array([float(b[s]) for s in seeds], dtype=float)
    diffs = av - bv
    if len(seeds) == 0:
        return Paired(0, None, None, None, None)
    if len(seeds) == 1:
        return Paired(1, float(diffs[0]), None, None, None)
    _, lo, hi = _t_interval(diffs, confidence)
    return Paired(len(seeds), float(np.mean(diffs)), lo, hi, _p_value(av, bv, diffs))


def verdict(p: Paired, better: str | None) -> str:
    """Only an interval wholly on one side of zero is a result; anything else says how many seeds it had, so
    a reader knows more seeds might still separate the two."""
    if better is None:
        return ""
    if better not in ("higher", "lower"):
        raise ValueError(f"better must be 'higher', 'lower' or None, not {better!r}")
    if p.n < 2 or p.lo is None or p.hi is None:
        return NEEDS_SEEDS
    if p.lo > 0:
        return "better" if better == "higher" else "worse"
    if p.hi < 0:
        return "worse" if better == "higher" else "better"
    return f"not distinguishable with {p.n} seeds"


def _dominates(p: tuple[float, float], q: tuple[float, float]) -> bool:
    """p is at least as cheap and as accurate as q, and strictly one of them."""
    return p[0] <= q[0] and p[1] >= q[1] and (p[0] < q[0] or p[1] > q[1])


def pareto_front(points: Sequence[tuple[str, float | None, float | None]]) -> list[str]:
    """Names of the (cost, accuracy) points no other point beats on both; equal points keep each other."""
    known = [(name, (float(c), float(acc))) for name, c, acc in points if _usable(c) and _usable(acc)]
    return [name for name, p in known if not any(_dominates(q, p) for _, q in known)]
