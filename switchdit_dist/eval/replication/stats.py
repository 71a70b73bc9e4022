"""The arithmetic of the multi-seed comparison, on plain lists so every number checks by hand.

Spread over seeds (mean, sample standard deviation), paired differences and ratios of two models
trained with the same seeds, linear interpolation along a curve, the first point where a curve
reaches a level, and the rule that calls a paired difference "ahead", "behind" or "within noise".
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

AHEAD, BEHIND, WITHIN_NOISE = "ahead", "behind", "within noise"


@dataclass(frozen=True)
class Spread:
    mean: float
    std: float  # sample standard deviation (n - 1 in the denominator); nan for one value
    n: int

    @property
    def sem(self) -> float:
        """Standard error of the mean (nan for one value)."""
        return self.std / math.sqrt(self.n) if self.n > 1 else math.nan


def spread(values: Sequence[float]) -> Spread:
    if not values:
        return Spread(math.nan, math.nan, 0)
    n = len(values)
    mean = sum(values) / n
    if n == 1:
        return Spread(mean, math.nan, 1)
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return Spread(mean, math.sqrt(var), n)


def median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    if not ordered:
        return math.nan
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def interpolate(xs: Sequence[float], ys: Sequence[float], x: float) -> float | None:
    """The piecewise-linear curve through (xs, ys) (xs ascending) at ``x``; None outside it."""
    if not xs or x < xs[0] or x > xs[-1]:
        return None
    for i in range(1, len(xs)):
        if x <= xs[i]:
            x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return ys[0]  # a single point, x == xs[0]


def first_crossing(
    xs: Sequence[float], ys: Sequence[float], level: float, lower_is_better: bool = True
) -> float | None:
    """The first x at which the curve reaches ``level`` (<= for lower-is-better metrics),
    interpolated linearly between the last point short of it and the first point at it; None
    when no point reaches it. A curve already at the level at its first point gives xs[0]."""

    def reached(y: float) -> bool:
        return y <= level if lower_is_better else y >= level

    for i, y in enumerate(ys):
        if reached(y):
            if i == 0:
                return xs[0]
            x0, x1, y0 = xs[i - 1], xs[i], ys[i - 1]
            return x0 + (x1 - x0) * (level - y0) / (y - y0)
    return None


def value_at_time(
    steps: Sequence[float], values: Sequence[float], step_time_s: float, time_s: float
) -> float | None:
    """A run's value after ``time_s`` seconds of training at ``step_time_s`` seconds per step:
    its curve over steps read at step time_s / step_time_s (None outside the measured steps)."""
    return interpolate(steps, values, time_s / step_time_s)


@dataclass(frozen=True)
class Comparison:
    """One metric at one point: DiT vs Switch-DiT over paired training seeds."""

    dit: Spread
    switch: Spread
    diff: Spread  # Switch-DiT - DiT, per seed
    ratio: Spread  # Switch-DiT / DiT, per seed
    wins: int  # seeds where Switch-DiT is strictly better
    n: int
    verdict: str  # AHEAD, BEHIND or WITHIN_NOISE (see `judge`)


def judge(diffs: Sequence[float], lower_is_better: bool, noise_std: float | None = None) -> str:
    """AHEAD (BEHIND) when Switch-DiT is better (worse) in every seed, there are at least two
    seeds, and the mean paired difference exceeds twice its standard error over seeds and twice
    ``noise_std`` (the spread of one paired difference over sampling seeds, when measured);
    WITHIN_NOISE otherwise. A rough rule for few seeds, not a significance test."""
    s = spread(diffs)
    if s.n < 2:
        return WITHIN_NOISE
    better = [(d < 0) if lower_is_better else (d > 0) for d in diffs]
    worse = [(d > 0) if lower_is_better else (d < 0) for d in diffs]
    margin = 2 * s.sem
    if noise_std is not None and not math.isnan(noise_std):
        margin = max(margin, 2 * noise_std)
    if abs(s.mean) <= margin:
        return WITHIN_NOISE
    if all(better):
        return AHEAD
    if all(worse):
        return BEHIND
    return WITHIN_NOISE


def compare(
    dit: Sequence[float],
    switch: Sequence[float],
    lower_is_better: bool,
    noise_std: float | None = None,
) -> Comparison:
    """Paired comparison: ``dit[i]`` and ``switch[i]`` come from the same training seed."""
    if len(dit) != len(switch):
        raise ValueError(f"paired values differ in length: {len(dit)} vs {len(switch)}")
    diffs = [s - d for d, s in zip(dit, switch)]
    ratios = [s / d for d, s in zip(dit, switch) if d != 0]
    wins = sum((x < 0) if lower_is_better else (x > 0) for x in diffs)
    return Comparison(
        dit=spread(dit),
        switch=spread(switch),
        diff=spread(diffs),
        ratio=spread(ratios),
        wins=wins,
        n=len(diffs),
        verdict=judge(diffs, lower_is_better, noise_std),
    )
