"""The replication's figure: means over training seeds with ±1 standard deviation bands.

Top: Fréchet distance, class accuracy and validation loss over steps. Bottom: the per-seed ratio
Switch-DiT / DiT (thin lines) with its mean, validation loss over measured training time, and the
validation loss of each timestep bucket relative to DiT's.
"""

from __future__ import annotations

from pathlib import Path

from switchdit_dist.eval.replication.analysis import Analysis, curve
from switchdit_dist.eval.replication.collect import Collected
from switchdit_dist.eval.replication.layout import LABELS, MODELS
from switchdit_dist.eval.replication.stats import Spread, spread
from switchdit_dist.train.metrics import NUM_BUCKETS

COLORS = {"dit": "tab:blue", "switch-dit": "tab:orange"}


def _band(ax, xs: list[float], spreads: list[Spread], color: str, label: str, marker: str | None = None):
    means = [s.mean for s in spreads]
    stds = [0.0 if s.n < 2 else s.std for s in spreads]
    ax.plot(xs, means, color=color, label=label, marker=marker)
    ax.fill_between(
        xs,
        [m - d for m, d in zip(means, stds)],
        [m + d for m, d in zip(means, stds)],
        color=color,
        alpha=0.2,
        linewidth=0,
    )


def _model_spreads(c: Collected, a: Analysis, metric: str, model: str) -> list[Spread]:
    by_step = {}
    for seed in a.seeds:
        steps, values = curve(c.runs[(model, seed)], metric, a.sampling_seed)
        for s, v in zip(steps, values):
            by_step.setdefault(s, []).append(v)
    return [spread(by_step.get(s, [])) for s in a.eval_steps]


def plot(c: Collected, a: Analysis, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(a.seeds)
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    for ax, (metric, title) in zip(
        axes[0][:2],
        (
            ("frechet_distance", "Fréchet distance (lower is better)"),
            ("accuracy", "class accuracy (higher is better)"),
        ),
    ):
        for model in MODELS:
            _band(ax, a.eval_steps, _model_spreads(c, a, metric, model), COLORS[model], LABELS[model], "o")
        ax.set_title(title)
        ax.set_xlabel("training step")
    ax = axes[0][2]
    for model in MODELS:
        points = a.val_curve[model]
        _band(ax, [s for s, _ in points], [sp for _, sp in points], COLORS[model], LABELS[model])
    ax.set_title("validation loss (raw weights)")
    ax.set_xlabel("training step")

    ax = axes[1][0]
    for metric, color, label in (
        ("frechet_distance", "tab:purple", "FD"),
        ("val_loss", "tab:green", "val loss"),
    ):
        rows = a.equal_steps.get(metric, [])
        for seed in a.seeds:
            d = dict(zip(*curve(c.runs[("dit", seed)], metric, a.sampling_seed)))
            s = dict(zip(*curve(c.runs[("switch-dit", seed)], metric, a.sampling_seed)))
            steps = sorted(set(d) & set(s))
            ax.plot(steps, [s[x] / d[x] for x in steps], color=color, alpha=0.35, linewidth=0.8)
        _band(
            ax, [st for st, _ in rows], [cmp.ratio for _, cmp in rows], color, f"{label} (mean of seeds)", "o"
        )
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_title("Switch-DiT / DiT per seed (below 1: Switch-DiT better)")
    ax.set_xlabel("training step")

    ax = axes[1][1]
    for model in MODELS:
        taus = list(a.step_time.get(model, {}).values())
        if not taus:
            continue
        tau = spread(taus).mean
        points = a.val_curve[model]
        _band(
            ax,
            [s * tau / 60 for s, _ in points],
            [sp for _, sp in points],
            COLORS[model],
            f"{LABELS[model]} ({tau:.3f} s/step)",
        )
    ax.set_title("validation loss at equal training time")
    ax.set_xlabel("training minutes (steps x median step time)")

    ax = axes[1][2]
    cmap = plt.get_cmap("viridis")
    for i, (step, row) in enumerate(sorted(a.buckets.items())):
        xs = [b for b in range(NUM_BUCKETS) if row[b] is not None]
        means = [100 * (row[b].ratio.mean - 1) for b in xs]
        errs = [0.0 if row[b].ratio.n < 2 else 100 * row[b].ratio.std for b in xs]
        ax.errorbar(
            xs,
            means,
            yerr=errs,
            marker="o",
            capsize=3,
            label=f"step {step}",
            color=cmap(i / max(len(a.buckets) - 1, 1)),
        )
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_title("validation loss per timestep bucket")
    ax.set_xlabel("timestep bucket (0: t < T/10, least noise)")
    ax.set_ylabel("% difference (below 0: Switch-DiT better)")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"DiT vs Switch-DiT, {n} training seed{'s' if n != 1 else ''}: mean ± 1 std")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
