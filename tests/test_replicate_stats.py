"""The replication's arithmetic against values computed by hand."""

import math

import pytest

from switchdit_dist.eval.replication.stats import (
    AHEAD,
    BEHIND,
    WITHIN_NOISE,
    compare,
    first_crossing,
    interpolate,
    judge,
    median,
    spread,
    value_at_time,
)


def test_spread_is_mean_and_sample_standard_deviation():
    s = spread([1.0, 2.0, 3.0, 4.0])
    # deviations -1.5 -0.5 0.5 1.5: squares sum to 5, over n - 1 = 3
    assert (s.mean, s.n) == (2.5, 4)
    assert s.std == pytest.approx(math.sqrt(5 / 3))
    assert s.sem == pytest.approx(math.sqrt(5 / 3) / 2)
    one = spread([5.0])
    assert one.mean == 5.0 and math.isnan(one.std) and math.isnan(one.sem)
    assert spread([]).n == 0


def test_median_of_odd_and_even_counts():
    assert median([3.0, 1.0, 2.0]) == 2.0
    assert median([4.0, 1.0, 2.0, 3.0]) == 2.5


def test_paired_comparison_lower_is_better():
    c = compare([10.0, 12.0, 14.0], [8.0, 9.0, 13.0], lower_is_better=True)
    # diffs -2 -3 -1: mean -2, std 1, standard error 1/sqrt(3) = 0.577 < 2 / 2
    assert (c.diff.mean, c.diff.std, c.wins, c.n) == (-2.0, 1.0, 3, 3)
    assert c.ratio.mean == pytest.approx((0.8 + 0.75 + 13 / 14) / 3)
    assert (c.dit.mean, c.switch.mean) == (12.0, 10.0)
    assert c.verdict == AHEAD
    # a sampling noise of 1.5 per paired difference: 2 x 1.5 = 3 > |mean| 2
    assert compare([10.0, 12.0, 14.0], [8.0, 9.0, 13.0], True, noise_std=1.5).verdict == WITHIN_NOISE


def test_judge_needs_agreement_of_every_seed_and_a_margin():
    assert judge([-0.5, 0.5, -0.6], lower_is_better=True) == WITHIN_NOISE  # 2 of 3
    # accuracy (higher is better) lower for Switch-DiT: diffs -0.1 -0.15, mean -0.125,
    # std 0.0354, standard error 0.025: 2 x 0.025 = 0.05 < 0.125
    assert judge([-0.1, -0.15], lower_is_better=False) == BEHIND
    assert judge([-0.1, -0.35], lower_is_better=True) == WITHIN_NOISE  # 2 x sem 0.125 > 0.225
    assert judge([-5.0], lower_is_better=True) == WITHIN_NOISE  # one seed: no verdict
    c = compare([0.5, 0.6], [0.4, 0.45], lower_is_better=False)
    assert (c.wins, c.verdict) == (0, BEHIND)


def test_interpolation_and_its_range():
    xs, ys = [0.0, 10.0, 20.0], [1.0, 3.0, 2.0]
    assert interpolate(xs, ys, 5.0) == 2.0
    assert interpolate(xs, ys, 15.0) == 2.5
    assert interpolate(xs, ys, 20.0) == 2.0
    assert interpolate(xs, ys, 25.0) is None and interpolate(xs, ys, -1.0) is None
    assert interpolate([7.0], [4.0], 7.0) == 4.0


def test_first_crossing_interpolates_between_the_points_around_the_level():
    steps, loss = [100.0, 200.0, 300.0], [0.5, 0.3, 0.1]
    assert first_crossing(steps, loss, 0.4) == pytest.approx(150.0)
    assert first_crossing(steps, loss, 0.6) == 100.0  # already there at the first point
    assert first_crossing(steps, loss, 0.05) is None
    assert first_crossing([1.0, 2.0, 3.0], [0.1, 0.5, 0.9], 0.7, lower_is_better=False) == pytest.approx(2.5)
    # the first crossing counts, not a later one
    assert first_crossing([0.0, 1.0, 2.0, 3.0], [1.0, 0.0, 1.0, 0.0], 0.5) == pytest.approx(0.5)


def test_value_at_equal_time():
    # 75 s at 0.5 s per step is step 150, half-way between 0.8 (step 100) and 0.6 (step 200)
    assert value_at_time([0.0, 100.0, 200.0], [1.0, 0.8, 0.6], 0.5, 75.0) == pytest.approx(0.7)
    assert value_at_time([100.0, 200.0], [0.8, 0.6], 0.5, 25.0) is None  # step 50: not measured
