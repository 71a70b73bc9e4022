"""The verdict, worded from the numbers alone: which claims the paired comparisons support.

Each evaluation step gets the label of :func:`stats.judge` (ahead / behind / within noise); a
claim is worded as the runs of equal labels along the steps, with the numbers of the last step.
"""

from __future__ import annotations

import math

from switchdit_dist.eval.replication.analysis import METRICS, Analysis, ThresholdRow
from switchdit_dist.eval.replication.stats import WITHIN_NOISE, Comparison, Spread, spread

DIGITS = {"frechet_distance": 2, "accuracy": 3, "val_loss": 4}


def fmt(s: Spread, digits: int) -> str:
    if s.n == 0 or math.isnan(s.mean):
        return "-"
    if s.n < 2:
        return f"{s.mean:.{digits}f}"
    return f"{s.mean:.{digits}f} ± {s.std:.{digits}f}"


def _steps(steps: list[int]) -> str:
    return (
        f"step {steps[0]}" if len(steps) == 1 else f"steps {', '.join(map(str, steps[:-1]))} and {steps[-1]}"
    )


def runs_of_labels(rows: list[tuple[int, str]]) -> list[tuple[str, list[int]]]:
    """[(step, label)] -> consecutive runs [(label, [steps])]."""
    groups: list[tuple[str, list[int]]] = []
    for step, label in rows:
        if groups and groups[-1][0] == label:
            groups[-1][1].append(step)
        else:
            groups.append((label, [step]))
    return groups


def describe(rows: list[tuple[int, Comparison]], what: str = "step") -> str:
    """'within noise at step 600; ahead at steps 1200 and 1800 (at 1800: better in 3 of 3 seeds,
    Switch-DiT / DiT 0.72 ± 0.06)'."""
    if not rows:
        return "not measured"
    parts = [
        f"{label} at {_steps(steps).replace('step', what)}"
        for label, steps in runs_of_labels([(s, c.verdict) for s, c in rows])
    ]
    last_step, last = rows[-1]
    return (
        "; ".join(parts) + f" (at {last_step}: Switch-DiT better in {last.wins} of {last.n} seeds, "
        f"Switch-DiT / DiT {fmt(last.ratio, 2)})"
    )


def _threshold(row: ThresholdRow, a: Analysis) -> str:
    def side(model: str) -> str:
        reached = [x for x in row.steps[model] if x is not None]
        secs = [x for x in row.seconds[model] if x is not None]
        n = len(row.steps[model])
        if not reached:
            return f"not reached by step {a.eval_steps[-1]} in any of {n} seeds"
        text = f"{fmt(spread(reached), 0)} steps"
        if secs:
            text += f", {fmt(spread([s / 60 for s in secs]), 1)} min"
        return text + f" ({len(reached)} of {n} seeds reached it)"

    label = METRICS[row.metric][0]
    digits = DIGITS[row.metric]
    text = (
        f"to reach {label} {row.level:.{digits}f} ({row.definition}): DiT {side('dit')}, "
        f"Switch-DiT {side('switch-dit')}"
    )
    if row.comparison is not None and row.time_comparison is not None:
        text += (
            f"; Switch-DiT / DiT {fmt(row.comparison.ratio, 2)} of the steps ({row.comparison.verdict}), "
            f"{fmt(row.time_comparison.ratio, 2)} of the time ({row.time_comparison.verdict})"
        )
    return text


def verdict_lines(a: Analysis) -> list[str]:
    lines = []
    for metric, (label, _) in METRICS.items():
        lines.append(f"At equal steps, {label}: {describe(a.equal_steps.get(metric, []))}.")
    for metric, (label, _) in METRICS.items():
        rows = [(r.dit_step, r.comparison) for r in a.equal_time.get(metric, []) if r.comparison is not None]
        lines.append(f"At equal time (DiT's time for a step), {label}: {describe(rows, 'DiT step')}.")
    for row in a.thresholds:
        text = _threshold(row, a)
        lines.append(f"Converges faster? {text[0].upper()}{text[1:]}.")
    if a.step_time_ratio.n:
        lines.append(f"Switch-DiT's median step time is {fmt(a.step_time_ratio, 2)}x DiT's.")
    if len(a.seeds) < 2:
        lines.append(f"One training seed only: every label is '{WITHIN_NOISE}' by rule.")
    return lines
