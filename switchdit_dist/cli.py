"""switchdit: prepare data, train, launch, export, sample and evaluate Switch-DiT models.

Thin on purpose: each subcommand lives in the module that does the work, which provides
``add_arguments(parser)`` and ``run(args) -> int``. Modules are imported only when their
subcommand runs, so ``switchdit --help`` stays fast and a broken optional dependency of one
subcommand cannot break the others.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from switchdit_dist.errors import UserError

# name -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "train": ("switchdit_dist.train.command", "train a model (one process; see `launch`)"),
    "launch": ("switchdit_dist.launch.local", "start N local processes running a subcommand"),
    "prepare": ("switchdit_dist.data.command", "write WebDataset shards of latents"),
    "submit": ("switchdit_dist.launch.slurm", "render and submit a SLURM job"),
    "convert": ("switchdit_dist.export.convert", "merge a sharded checkpoint into one safetensors file"),
    "import": ("switchdit_dist.export.importer", "convert public DiT / Switch-DiT weights"),
    "sample": ("switchdit_dist.export.sample", "sample an image grid from an exported model"),
    "eval": ("switchdit_dist.eval.command", "score samples (digits classifier, FID plumbing)"),
    "bench": ("switchdit_dist.bench.command", "benchmarks (moe, data, train)"),
    "plan": ("switchdit_dist.bench.plan", "estimate communication and memory before launching"),
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="switchdit", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="subcommand", metavar="COMMAND")
    sub.required = True
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        if only is None or name == only:
            importlib.import_module(module_name).add_arguments(sp)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    chosen = argv[0] if argv and argv[0] in SUBCOMMANDS else None
    parser = build_parser(only=chosen if chosen else "__none__")
    args = parser.parse_args(argv)
    module = importlib.import_module(SUBCOMMANDS[args.subcommand][0])
    try:
        return int(module.run(args) or 0)
    except UserError as err:
        print(f"switchdit {args.subcommand}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
