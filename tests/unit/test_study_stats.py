"""Study statistics against values worked out by hand: t quantiles from a printed t table, and the paired p-value
from the closed form of Student's t with 2 degrees of freedom, two-sided p = 1 - t / sqrt(2 + t^2)."""

from __future__ import annotations

import math

import pytest

from imgcls_dist.study.stats import METHOD, Interval, Paired, mean_ci, paired_difference, pareto_front, verdict

T_975_DF3 = 3.182446  # t table: 0.975 quantile, 3 degrees of freedom
T_95_DF3 = 2.353363
T_975_DF2 = 4.302653
SD_1234 = math.sqrt(5 / 3)  # deviations -1.5, -0.5, 0.5, 1.5: squares sum to 5, over n-1 = 3


def test_mean_ci_of_four_values():
    ci = mean_ci([1, 2, 3, 4])
    assert ci.n == 4
    assert ci.mean == pytest.approx(2.5)
    assert ci.sd == pytest.approx(1.2909944, abs=1e-7)
    half = T_975_DF3 * SD_1234 / 2
    assert half == pytest.approx(2.054260, abs=1e-6)
    assert ci.lo == pytest.approx(2.5 - half, abs=1e-5)
    assert ci.hi == pytest.approx(2.5 + half, abs=1e-5)


def test_mean_ci_narrows_with_lower_confidence():
    ci = mean_ci([1, 2, 3, 4], confidence=0.90)
    assert ci.hi - ci.lo == pytest.approx(2 * T_95_DF3 * SD_1234 / 2, abs=1e-5)


def test_mean_ci_drops_none_and_nan():
    assert mean_ci([None, 1, float("nan"), 2, 3, None, 4]) == mean_ci([1, 2, 3, 4])


def test_mean_ci_empty_and_single():
    assert mean_ci([]) == Interval(0, None, None, None, None)
    assert mean_ci([None, float("nan")]) == Interval(0, None, None, None, None)
    assert mean_ci([0.7, None]) == Interval(1, 0.7, None, None, None)


def test_mean_ci_of_identical_values_is_a_point():
    ci = mean_ci([0.25, 0.25, 0.25])
    assert (ci.n, ci.mean, ci.sd, ci.lo, ci.hi) == (3, 0.25, 0.0, 0.25, 0.25)


def test_paired_difference_uses_only_seeds_both_sides_measured():
    a = {1: 12.0, 2: 13.0, 3: 15.0, 4: 99.0, 6: None, 7: 50.0}
    b = {1: 10.0, 2: 10.0, 3: 10.0, 5: -99.0, 6: 1.0, 7: float("nan")}
    p = paired_difference(a, b)  # diffs 2, 3, 5
    assert p.n == 3
    assert p.mean_diff == pytest.approx(10 / 3)
    sd = math.sqrt(((2 - 10 / 3) ** 2 + (3 - 10 / 3) ** 2 + (5 - 10 / 3) ** 2) / 2)
    half = T_975_DF2 * sd / math.sqrt(3)
    assert half == pytest.approx(3.794583, abs=1e-5)
    assert p.lo == pytest.approx(10 / 3 - half, abs=1e-5)
    assert p.hi == pytest.approx(10 / 3 + half, abs=1e-5)
    t = (10 / 3) / (sd / math.sqrt(3))
    assert t * t == pytest.approx(100 / 7)
    assert p.p_value == pytest.approx(1 - t / math.sqrt(2 + t * t), abs=1e-9)
    assert p.p_value == pytest.approx(0.0634142, abs=1e-6)


def test_paired_difference_is_antisymmetric():
    a, b = {1: 0.80, 2: 0.82, 3: 0.85}, {1: 0.78, 2: 0.79, 3: 0.80}
    ab, ba = paired_difference(a, b), paired_difference(b, a)
    assert ab.mean_diff == pytest.approx(-ba.mean_diff)
    assert ab.lo == pytest.approx(-ba.hi)
    assert ab.p_value == pytest.approx(ba.p_value)


def test_paired_difference_too_few_seeds():
    assert paired_difference({1: 1.0}, {2: 1.0}) == Paired(0, None, None, None, None)
    assert paired_difference({1: 3.0, 2: 5.0}, {1: 1.0, 2: None}) == Paired(1, 2.0, None, None, None)


def test_paired_difference_constant_shift():
    shifted = paired_difference({1: 1.5, 2: 2.5, 3: 3.5}, {1: 1.0, 2: 2.0, 3: 3.0})
    assert (shifted.n, shifted.lo, shifted.hi, shifted.p_value) == (3, 0.5, 0.5, 0.0)
    same = paired_difference({1: 1.0, 2: 2.0}, {1: 1.0, 2: 2.0})
    assert (same.mean_diff, same.lo, same.hi, same.p_value) == (0.0, 0.0, 0.0, 1.0)


def test_verdict_from_the_interval_and_the_direction():
    up = Paired(4, 1.0, 0.74, 1.26, 0.001)
    down = Paired(4, -1.0, -1.26, -0.74, 0.001)
    straddles = Paired(3, 0.3, -0.1, 0.7, 0.2)
    assert verdict(up, "higher") == "better"
    assert verdict(up, "lower") == "worse"
    assert verdict(down, "higher") == "worse"
    assert verdict(down, "lower") == "better"
    assert verdict(straddles, "higher") == "not distinguishable with 3 seeds"
    assert verdict(straddles, "lower") == "not distinguishable with 3 seeds"
    assert verdict(up, None) == ""


def test_verdict_on_computed_differences():
    a = {1: 2.0, 2: 2.2, 3: 1.8, 4: 2.0}
    b = {1: 1.0, 2: 1.0, 3: 1.0, 4: 1.0}  # diffs 1.0, 1.2, 0.8, 1.0: half width 3.182446 * 0.163299 / 2 = 0.2598
    p = paired_difference(a, b)
    assert p.lo == pytest.approx(1.0 - T_975_DF3 * math.sqrt(0.08 / 3) / 2, abs=1e-5)
    assert verdict(p, "higher") == "better"
    assert verdict(paired_difference(b, a), "higher") == "worse"
    assert verdict(paired_difference(b, a), "lower") == "better"


def test_verdict_zero_width_interval():
    assert verdict(Paired(3, 0.5, 0.5, 0.5, 0.0), "higher") == "better"
    assert verdict(Paired(3, -0.5, -0.5, -0.5, 0.0), "higher") == "worse"
    assert verdict(Paired(3, 0.0, 0.0, 0.0, 1.0), "higher") == "not distinguishable with 3 seeds"


def test_verdict_needs_two_seeds():
    assert verdict(Paired(1, 5.0, None, None, None), "higher") == "needs 2 or more paired seeds"
    assert verdict(Paired(0, None, None, None, None), "lower") == "needs 2 or more paired seeds"
    assert verdict(Paired(1, 5.0, None, None, None), None) == ""


def test_verdict_rejects_unknown_direction():
    with pytest.raises(ValueError):
        verdict(Paired(3, 0.5, 0.1, 0.9, 0.01), "up")


def test_pareto_front_drops_dominated_points():
    points = [("big", 10.0, 0.90), ("small", 1.0, 0.80), ("worse", 5.0, 0.79), ("mid", 5.0, 0.85)]
    assert pareto_front(points) == ["big", "small", "mid"]


def test_pareto_front_equal_cost_keeps_the_more_accurate():
    assert pareto_front([("a", 2.0, 0.7), ("b", 2.0, 0.8)]) == ["b"]
    assert pareto_front([("a", 2.0, 0.8), ("b", 3.0, 0.8)]) == ["a"]


def test_pareto_front_identical_points_both_stay():
    assert pareto_front([("a", 2.0, 0.8), ("b", 2.0, 0.8), ("c", 3.0, 0.7)]) == ["a", "b"]


def test_pareto_front_leaves_out_unmeasured_points():
    points = [("fast-unknown", None, 0.99), ("nan", 0.1, float("nan")), ("x", 4.0, 0.6), ("y", 1.0, None)]
    assert pareto_front(points) == ["x"]
    assert pareto_front([]) == []


def test_method_names_the_test():
    assert "Student-t" in METHOD and "paired" in METHOD
