"""The comparison of DiT and Switch-DiT built from the collected runs.

- at equal steps: each metric at each evaluation step, paired over training seeds;
- per timestep bucket: the validation loss of each tenth of the noise levels;
- at equal time: a run's clock is its step count times its median logged ``step_time_s`` (the
  median shrugs off intervals slowed by other jobs or a checkpoint write); at the time DiT needed
  for each evaluation step, Switch-DiT's curve is read by linear interpolation in its steps;
- "converges faster": the steps (and seconds) each run needs to reach fixed levels, namely DiT's
  seed-mean value at its last two evaluation steps;
- sampling noise: one checkpoint pair scored with several sampling seeds, apart from the
  training-seed spread (every other evaluation uses the one fixed sampling seed).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from switchdit_dist.eval.replication.collect import Collected, RunData
from switchdit_dist.eval.replication.stats import (
    Comparison,
    Spread,
    compare,
    first_crossing,
    median,
    spread,
    value_at_time,
)
from switchdit_dist.train.metrics import NUM_BUCKETS

# metric -> (label, lower is better)
METRICS: dict[str, tuple[str, bool]] = {
    "frechet_distance": ("Fréchet distance", True),
    "accuracy": ("class accuracy", False),
    "val_loss": ("validation loss", True),
}


@dataclass(frozen=True)
class EqualTimeRow:
    dit_step: int
    seconds: Spread  # DiT's time to reach dit_step, over seeds
    switch_step: Spread  # the step Switch-DiT reached in that time
    comparison: Comparison | None  # over the seeds where Switch-DiT's curve covers that step


@dataclass(frozen=True)
class ThresholdRow:
    metric: str
    level: float
    definition: str
    steps: dict[str, list[float | None]]  # model -> per seed (None: not reached)
    seconds: dict[str, list[float | None]]
    comparison: Comparison | None  # of the steps, when every run of both models reached the level
    time_comparison: Comparison | None  # of the seconds, likewise


@dataclass(frozen=True)
class SamplingNoise:
    seed: int
    step: int
    sampling_seeds: list[int]
    per_model: dict[str, dict[str, Spread]]  # model -> metric -> spread over sampling seeds
    diff: dict[str, Spread]  # metric -> spread of the paired difference over sampling seeds


@dataclass(frozen=True)
class Analysis:
    seeds: list[int]
    eval_steps: list[int]
    sampling_seed: int
    step_time: dict[str, dict[int, float]]  # model -> seed -> median seconds per step
    step_time_ratio: Spread  # Switch-DiT / DiT, per seed
    equal_steps: dict[str, list[tuple[int, Comparison]]]  # metric -> (step, comparison)
    val_curve: dict[str, list[tuple[int, Spread]]]  # model -> (step, spread), every validation step
    buckets: dict[int, list[Comparison | None]]  # evaluation step -> one per bucket
    equal_time: dict[str, list[EqualTimeRow]]
    thresholds: list[ThresholdRow]
    sampling_noise: SamplingNoise | None
    eval_seconds: Spread  # one evaluation (sampling + scoring), over every evaluation
    eval_samples: int
    train_seconds: dict[str, Spread]


def curve(run: RunData, metric: str, sampling_seed: int) -> tuple[list[int], list[float]]:
    """(steps, values) of one run: validation loss at every validation step, the others at every
    evaluation step."""
    if metric == "val_loss":
        points = sorted(run.val_loss.items())
    else:
        points = [(s, getattr(r, metric)) for s, r in run.eval_curve(sampling_seed).items()]
    return [s for s, _ in points], [v for _, v in points]


def value_at(run: RunData, metric: str, step: int, sampling_seed: int) -> float | None:
    steps, values = curve(run, metric, sampling_seed)
    return values[steps.index(step)] if step in steps else None


def _paired(c: Collected, get: Callable[[RunData], float | None]) -> tuple[list[float], list[float]]:
    """Values of both models for the seeds where both have one."""
    dit, switch = [], []
    for seed in c.seeds:
        a, b = get(c.runs[("dit", seed)]), get(c.runs[("switch-dit", seed)])
        if a is not None and b is not None:
            dit.append(a)
            switch.append(b)
    return dit, switch


def _compare_or_none(dit: list[float], switch: list[float], lower: bool, noise: float | None = None):
    return compare(dit, switch, lower, noise) if dit else None


def median_step_times(c: Collected) -> dict[str, dict[int, float]]:
    times: dict[str, dict[int, float]] = {}
    for (model, seed), run in c.runs.items():
        if seed in c.seeds and run.step_time_s:
            times.setdefault(model, {})[seed] = median(list(run.step_time_s.values()))
    return times


def sampling_noise(c: Collected) -> SamplingNoise | None:
    """Spread over sampling seeds of the first training seed's last checkpoint pair."""
    seed, step = c.seeds[0], c.eval_steps[-1]
    runs = {m: c.runs[(m, seed)] for m in ("dit", "switch-dit")}
    common = sorted(set.intersection(*({k for (s, k) in r.evals if s == step} for r in runs.values())))
    if len(common) < 2:
        return None
    per_model, diff = {}, {}
    for metric in ("frechet_distance", "accuracy"):
        values = {m: [getattr(r.evals[(step, k)], metric) for k in common] for m, r in runs.items()}
        for m in runs:
            per_model.setdefault(m, {})[metric] = spread(values[m])
        diff[metric] = spread([b - a for a, b in zip(values["dit"], values["switch-dit"])])
    return SamplingNoise(seed, step, common, per_model, diff)


def equal_time_rows(
    c: Collected, metric: str, times: dict[str, dict[int, float]], noise: float | None
) -> list[EqualTimeRow]:
    lower = METRICS[metric][1]
    rows = []
    for step in c.eval_steps:
        seconds, switch_steps, dit_values, switch_values = [], [], [], []
        for seed in c.seeds:
            tau_d, tau_s = times.get("dit", {}).get(seed), times.get("switch-dit", {}).get(seed)
            a = value_at(c.runs[("dit", seed)], metric, step, c.sampling_seed)
            if tau_d is None or tau_s is None or a is None:
                continue
            seconds.append(step * tau_d)
            switch_steps.append(step * tau_d / tau_s)  # the step Switch-DiT reached in that time
            b = value_at_time(
                *curve(c.runs[("switch-dit", seed)], metric, c.sampling_seed), tau_s, step * tau_d
            )
            if b is not None:
                dit_values.append(a)
                switch_values.append(b)
        if seconds:
            rows.append(
                EqualTimeRow(
                    step,
                    spread(seconds),
                    spread(switch_steps),
                    _compare_or_none(dit_values, switch_values, lower, noise),
                )
            )
    return rows


def threshold_rows(c: Collected, times: dict[str, dict[int, float]]) -> list[ThresholdRow]:
    rows = []
    for metric in ("val_loss", "frechet_distance"):
        lower = METRICS[metric][1]
        for step in c.eval_steps[-2:]:
            dit_values = [value_at(c.runs[("dit", s)], metric, step, c.sampling_seed) for s in c.seeds]
            dit_values = [v for v in dit_values if v is not None]
            if not dit_values:
                continue
            level = spread(dit_values).mean
            steps: dict[str, list[float | None]] = {}
            seconds: dict[str, list[float | None]] = {}
            for model in ("dit", "switch-dit"):
                for seed in c.seeds:
                    x = first_crossing(*curve(c.runs[(model, seed)], metric, c.sampling_seed), level, lower)
                    tau = times.get(model, {}).get(seed)
                    steps.setdefault(model, []).append(x)
                    seconds.setdefault(model, []).append(None if x is None or tau is None else x * tau)
            reached_all = all(x is not None for xs in (*steps.values(), *seconds.values()) for x in xs)
            by_steps = compare(steps["dit"], steps["switch-dit"], True) if reached_all else None
            by_time = compare(seconds["dit"], seconds["switch-dit"], True) if reached_all else None
            rows.append(
                ThresholdRow(metric, level, f"DiT's mean at step {step}", steps, seconds, by_steps, by_time)
            )
    return rows


def analyse(c: Collected) -> Analysis:
    times = median_step_times(c)
    noise = sampling_noise(c)
    noise_std = {m: noise.diff[m].std for m in noise.diff} if noise else {}
    equal_steps: dict[str, list[tuple[int, Comparison]]] = {}
    for metric, (_, lower) in METRICS.items():
        for step in c.eval_steps:
            dit, switch = _paired(c, lambda r, m=metric, s=step: value_at(r, m, s, c.sampling_seed))
            cmp = _compare_or_none(dit, switch, lower, noise_std.get(metric))
            if cmp is not None:
                equal_steps.setdefault(metric, []).append((step, cmp))
    val_curve: dict[str, list[tuple[int, Spread]]] = {}
    for model in ("dit", "switch-dit"):
        runs = [c.runs[(model, s)] for s in c.seeds]
        common = sorted(set.intersection(*(set(r.val_loss) for r in runs)))
        val_curve[model] = [(step, spread([r.val_loss[step] for r in runs])) for step in common]
    buckets: dict[int, list[Comparison | None]] = {}
    for step in c.eval_steps:
        row = []
        for b in range(NUM_BUCKETS):
            dit, switch = _paired(c, lambda r, s=step, b=b: (r.val_buckets.get(s) or [None] * NUM_BUCKETS)[b])
            row.append(_compare_or_none(dit, switch, True))
        if any(x is not None for x in row):
            buckets[step] = row
    ratio = spread(
        [
            times["switch-dit"][s] / times["dit"][s]
            for s in c.seeds
            if s in times.get("dit", {}) and s in times.get("switch-dit", {})
        ]
    )
    evals = [r for (m, s), run in c.runs.items() if s in c.seeds for r in run.evals.values()]
    train_seconds = {
        m: spread(
            [float(c.runs[(m, s)].train["seconds"]) for s in c.seeds if "seconds" in c.runs[(m, s)].train]
        )
        for m in ("dit", "switch-dit")
    }
    return Analysis(
        seeds=list(c.seeds),
        eval_steps=list(c.eval_steps),
        sampling_seed=c.sampling_seed,
        step_time=times,
        step_time_ratio=ratio,
        equal_steps=equal_steps,
        val_curve=val_curve,
        buckets=buckets,
        equal_time={m: equal_time_rows(c, m, times, noise_std.get(m)) for m in METRICS},
        thresholds=threshold_rows(c, times),
        sampling_noise=noise,
        eval_seconds=spread([r.seconds for r in evals]),
        eval_samples=max((r.num_samples for r in evals), default=0),
        train_seconds=train_seconds,
    )
