"""The report of the small-scale replication (``tools/replicate_small.sh``): DiT vs Switch-DiT.

The script trains both models into ``OUT/dit`` and ``OUT/switch-dit`` and scores the EMA weights
of each kept checkpoint with ``switchdit eval --digits --json`` into
``OUT/<model>/eval_step_XXXXXXXX.json``. This module reads those files (and each run's
``validation.jsonl``), prints one table with both models side by side, writes the numbers to
``OUT/results.json`` and draws the curves into a PNG::

    python -m switchdit_dist.eval.replicate --out runs/replicate_small [--plot curves.png] [--json]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from switchdit_dist.errors import UserError

MODELS = ("dit", "switch-dit")
LABELS = {"dit": "DiT", "switch-dit": "Switch-DiT"}
_EVAL_FILE = re.compile(r"^eval_step_(\d{8})\.json$")


@dataclass
class EvalPoint:
    model: str
    step: int
    frechet_distance: float
    accuracy: float
    val_loss: float | None  # validation loss logged at this step (raw weights), if any


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(
            f"{path}: expected the JSON object that `switchdit eval --json` prints ({err})"
        ) from None


def read_validation(run_dir: Path) -> dict[int, float]:
    """step -> validation loss from ``run_dir/validation.jsonl`` (empty when validation was off)."""
    path = run_dir / "validation.jsonl"
    if not path.is_file():
        return {}
    losses = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            losses[int(record["step"])] = float(record["val_loss"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            raise UserError(f"{path}:{number}: expected a JSON line with 'step' and 'val_loss'") from None
    return losses


def collect(out_dir: str | Path) -> list[EvalPoint]:
    """Every evaluated checkpoint of both models, ordered by model then step."""
    out_dir = Path(out_dir)
    points = []
    for model in MODELS:
        run_dir = out_dir / model
        files = sorted(p for p in run_dir.glob("eval_step_*.json") if _EVAL_FILE.match(p.name))
        if not files:
            raise UserError(
                f"{run_dir}: no eval_step_XXXXXXXX.json files (has the {model} run been evaluated?)"
            )
        val = read_validation(run_dir)
        for path in files:
            step = int(_EVAL_FILE.match(path.name).group(1))
            record = read_json(path)
            try:
                fd, acc = float(record["frechet_distance"]), float(record["accuracy"])
            except (KeyError, TypeError, ValueError):
                raise UserError(
                    f"{path}: expected keys 'frechet_distance' and 'accuracy' with numbers"
                ) from None
            points.append(EvalPoint(model, step, fd, acc, val.get(step)))
    steps = {m: [p.step for p in points if p.model == m] for m in MODELS}
    if steps["dit"] != steps["switch-dit"]:
        raise UserError(
            f"{out_dir}: the two models were evaluated at different steps (dit {steps['dit']}, "
            f"switch-dit {steps['switch-dit']}); expected the same steps for both"
        )
    return points


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(points: list[EvalPoint]) -> str:
    by_key = {(p.model, p.step): p for p in points}
    steps = sorted({p.step for p in points})
    lines = [
        f"{'step':>6}  {'FD DiT':>8} {'FD Switch':>10} {'ratio':>6}  {'acc DiT':>8} {'acc Switch':>11}"
        f"  {'val DiT':>8} {'val Switch':>11}",
    ]
    for step in steps:
        d, s = by_key[("dit", step)], by_key[("switch-dit", step)]
        lines.append(
            f"{step:>6}  {d.frechet_distance:>8.2f} {s.frechet_distance:>10.2f} "
            f"{s.frechet_distance / d.frechet_distance:>6.2f}  {d.accuracy:>8.3f} {s.accuracy:>11.3f}"
            f"  {_fmt(d.val_loss, '8.4f'):>8} {_fmt(s.val_loss, '11.4f'):>11}"
        )
    lines.append(
        "FD: Fréchet distance in the digits classifier's feature space (lower is better); ratio: "
        "Switch-DiT / DiT; acc: class accuracy of the samples; val: validation loss (raw weights)."
    )
    return "\n".join(lines)


def plot(points: list[EvalPoint], val_curves: dict[str, dict[int, float]], path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("frechet_distance", "Fréchet distance (digits features)"), ("accuracy", "class accuracy")]
    with_val = any(val_curves.values())
    fig, axes = plt.subplots(1, 3 if with_val else 2, figsize=(13 if with_val else 9, 3.6))
    for ax, (key, title) in zip(axes, panels):
        for model in MODELS:
            mine = sorted((p for p in points if p.model == model), key=lambda p: p.step)
            ax.plot([p.step for p in mine], [getattr(p, key) for p in mine], marker="o", label=LABELS[model])
        ax.set_title(title)
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
    if with_val:
        ax = axes[2]
        for model in MODELS:
            curve = sorted(val_curves.get(model, {}).items())
            ax.plot([s for s, _ in curve], [v for _, v in curve], label=LABELS[model])
        ax.set_title("validation loss (raw weights)")
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(out_dir: str | Path, plot_path: str | Path | None = None) -> tuple[list[EvalPoint], str]:
    """Collects the evaluations, writes ``OUT/results.json`` and the plot; returns points and table."""
    out_dir = Path(out_dir)
    points = collect(out_dir)
    val_curves = {model: read_validation(out_dir / model) for model in MODELS}
    (out_dir / "results.json").write_text(json.dumps([asdict(p) for p in points], indent=1) + "\n")
    plot(points, val_curves, plot_path or out_dir / "curves.png")
    return points, format_table(points)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="the replication's output folder")
    parser.add_argument("--plot", help="PNG to write (default OUT/curves.png)")
    parser.add_argument("--json", action="store_true", help="print the points as JSON instead of a table")
    args = parser.parse_args(argv)
    try:
        points, table = report(args.out, args.plot)
    except UserError as err:
        print(f"replicate: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps([asdict(p) for p in points]) if args.json else table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
