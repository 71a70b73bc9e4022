"""The small-scale replication of Switch-DiT's claim: DiT vs Switch-DiT over several training seeds.

For each training seed it trains both models (same size, steps, batch, data order and noise),
scores the EMA weights at every evaluation step with the same sampling noise for both, scores one
checkpoint pair with extra sampling seeds (sampling noise apart from training noise), and writes
the comparison: ``OUT/results.md``, ``OUT/results.json``, ``OUT/curves.png``, ``OUT/gates.png``,
and with ``--docs`` the same section spliced into a markdown file with the figures beside it::

    python -m switchdit_dist.eval.replicate --out runs/replicate_seeds --seeds 0,1,2 [--docs docs/results.md]
    python -m switchdit_dist.eval.replicate --out runs/replicate_seeds --report-only

A rerun with the same ``--out`` skips finished training runs and evaluations (see
:mod:`switchdit_dist.eval.replication.runner`). ``tools/replicate_small.sh`` is this command.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from switchdit_dist.errors import UserError

COMMAND_ENV = "SWITCHDIT_REPLICATE_COMMAND"  # set by tools/replicate_small.sh to its own command line


def _seeds(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/replicate_seeds", help="output folder (default %(default)s)")
    parser.add_argument("--seeds", type=_seeds, default=(0, 1, 2), help="training seeds, e.g. 0,1,2")
    parser.add_argument("--steps", type=int, default=1800, help="training steps per run")
    parser.add_argument("--eval-every", type=int, help="steps between evaluations (default steps/3)")
    parser.add_argument("--data", help="prepared digits folder (default OUT/data, written once)")
    parser.add_argument("--config", default="configs/demo.yaml", help="base training config")
    parser.add_argument("--nproc", type=int, default=2, help="training processes")
    parser.add_argument("--experts", type=int, default=3, help="Switch-DiT experts per block")
    parser.add_argument("--ep-size", type=int, default=1, help="Switch-DiT expert-parallel size")
    parser.add_argument("--zero-stage", type=int, default=0, choices=(0, 1, 2))
    parser.add_argument("--samples", type=int, default=1000, help="samples per evaluation (1/10 per digit)")
    parser.add_argument("--sampling-steps", type=int, default=10, help="sampler steps (default 10)")
    parser.add_argument("--sampler", choices=("ddim", "ddpm"), default="ddim")
    parser.add_argument("--cfg-scale", type=float, default=1.5)
    parser.add_argument("--eval-batch", type=int, default=250, help="images per sampling batch")
    parser.add_argument("--sampling-seed", type=int, default=0, help="sampling seed of every evaluation")
    parser.add_argument(
        "--spread-seeds", type=int, default=3, help="extra sampling seeds scored on one checkpoint pair"
    )
    parser.add_argument(
        "--eval-threads", type=int, help="threads for evaluation (default OMP_NUM_THREADS or all)"
    )
    parser.add_argument("--docs", help="markdown file to splice the results into (figures beside it)")
    parser.add_argument("--figure-name", default="results_seeds", help="figure file stem next to --docs")
    parser.add_argument("--report-only", action="store_true", help="only regenerate the report from OUT")


def settings_from(args: argparse.Namespace):
    from switchdit_dist.eval.replication.runner import RunSettings
    from switchdit_dist.eval.replication.scoring import EvalSettings

    threads = args.eval_threads or int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1)
    return RunSettings(
        out=Path(args.out),
        seeds=args.seeds,
        steps=args.steps,
        eval_every=args.eval_every or max(args.steps // 3, 1),
        data=Path(args.data) if args.data else None,
        config=Path(args.config),
        nproc=args.nproc,
        experts=args.experts,
        ep_size=args.ep_size,
        zero_stage=args.zero_stage,
        sampling_seed=args.sampling_seed,
        spread_seeds=args.spread_seeds,
        eval_threads=max(threads, 1),
        eval=EvalSettings(
            samples=args.samples,
            sampling_steps=args.sampling_steps,
            sampler=args.sampler,
            cfg_scale=args.cfg_scale,
            batch_size=args.eval_batch,
        ),
    )


def _clean(value: Any) -> Any:
    """NaN (a spread of one value) is not JSON: null; tuple and int keys become strings."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def report(
    out: Path, sampling_seed: int = 0, docs: Path | None = None, figure_name: str = "results_seeds"
) -> str:
    """Writes OUT/results.{md,json}, OUT/curves.png, OUT/gates.png (and the --docs splice)."""
    from switchdit_dist.eval.replication import figures, gates, markdown
    from switchdit_dist.eval.replication.analysis import analyse
    from switchdit_dist.eval.replication.collect import collect
    from switchdit_dist.eval.replication.layout import Layout

    c = collect(out, sampling_seed)
    a = analyse(c)
    figures.plot(c, a, out / "curves.png")
    model_file = Layout(out).ema_model("switch-dit", c.seeds[0], c.eval_steps[-1])
    summary = None
    if model_file.is_file():
        probs = gates.gate_probs(model_file)
        gates.save_heatmap(probs, out / "gates.png")
        summary = gates.summarize(model_file, probs)
    (out / "results.json").write_text(
        json.dumps(_clean({"analysis": asdict(a), "gates": asdict(summary) if summary else None}), indent=1)
        + "\n"
    )
    text = markdown.render(c, a, "curves.png", "gates.png" if summary else None, summary)
    (out / "results.md").write_text(text)
    if docs is not None:
        shutil.copyfile(out / "curves.png", docs.parent / f"{figure_name}.png")
        if summary:
            shutil.copyfile(out / "gates.png", docs.parent / f"{figure_name}_gates.png")
        markdown.splice(
            docs,
            markdown.render(
                c, a, f"{figure_name}.png", f"{figure_name}_gates.png" if summary else None, summary
            ),
        )
    return text


def run(args: argparse.Namespace) -> int:
    from switchdit_dist.eval.replication.runner import Replication

    settings = settings_from(args)  # every argument is checked before anything is written
    docs = Path(args.docs) if args.docs else None
    if docs is not None and not docs.parent.is_dir():
        raise UserError(f"--docs {docs}: the folder {docs.parent} does not exist")
    if not args.report_only:
        argv = getattr(args, "argv", None)
        command = os.environ.get(COMMAND_ENV) or shlex.join(
            ["python", "-m", "switchdit_dist.eval.replicate", *(sys.argv[1:] if argv is None else argv)]
        )
        replication = Replication(settings, command)
        with replication.invocation():
            replication.run()
    text = report(settings.out, settings.sampling_seed, docs, args.figure_name)
    print(text)
    print(f"report: {settings.out / 'results.md'}" + (f"; spliced into {docs}" if docs else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="replicate", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    args.argv = argv
    try:
        return run(args)
    except UserError as err:
        print(f"replicate: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
