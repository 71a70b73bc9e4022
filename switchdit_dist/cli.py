"""switchdit: prepare data, train, launch, export, sample and evaluate Switch-DiT models.

Thin on purpose: each subcommand lives in the module that does the work, which provides
``add_arguments(parser)`` and ``run(args) -> int``. Modules are imported only when their
subcommand runs, so ``switchdit --help`` stays fast and a broken optional dependency of one
subcommand cannot break the others.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import re
import sys

from switchdit_dist.errors import UserError

# name -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "train": ("switchdit_dist.train.command", "train a model (one process; see `launch`)"),
    "launch": ("switchdit_dist.launch.local", "start N local processes running a subcommand"),
    "prepare": ("switchdit_dist.data.command", "write WebDataset shards of latents"),
    "submit": ("switchdit_dist.launch.slurm", "render and submit a SLURM job"),
    "convert": ("switchdit_dist.export.convert", "merge a sharded checkpoint into one safetensors file"),
    "verify": ("switchdit_dist.checkpoint.verify_command", "check checkpoint files against their manifests"),
    "import": ("switchdit_dist.export.importer", "convert public DiT / Switch-DiT weights"),
    "sample": ("switchdit_dist.sampling.command", "sample an image grid from an exported model"),
    "eval": ("switchdit_dist.eval.command", "score samples (digits classifier, FID plumbing)"),
    "bench": ("switchdit_dist.bench.command", "benchmarks (moe, data, train, ckpt, placement)"),
    "plan": ("switchdit_dist.capacity", "estimate communication and memory before launching"),
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


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Parse a command line; ``KEY=VALUE`` overrides may come before, between or after the options
    of a subcommand that takes them (argparse alone accepts them in one place only)."""
    chosen = argv[0] if argv and argv[0] in SUBCOMMANDS else None
    parser = build_parser(only=chosen if chosen else "__none__")
    args, extra = parser.parse_known_args(argv)
    if extra:
        overrides = [a for a in extra if _OVERRIDE.match(a)]
        if len(overrides) < len(extra) or not hasattr(args, "overrides"):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *overrides]
    return args


_OVERRIDE = re.compile(r"^[A-Za-z_][\w.]*=")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from switchdit_dist.launch import local

    local.follow_launcher()  # a rank of `switchdit launch` ends with its launcher
    code = 1  # an exception escaping below ends the process with 1
    try:
        code = _run(argv)
    except SystemExit as stop:  # argparse, or a subcommand's sys.exit
        code = stop.code if isinstance(stop.code, int) else 2
        raise
    finally:
        local.record_exit(code)
    return code


def _run(argv: list[str]) -> int:
    args = parse_args(argv)
    module = importlib.import_module(SUBCOMMANDS[args.subcommand][0])
    try:
        return int(module.run(args) or 0)
    except UserError as err:
        print(f"switchdit {args.subcommand}: error: {err}", file=sys.stderr)
        return 2


def console_main() -> None:
    """The ``switchdit`` command (and ``python -m switchdit_dist.cli``, as ranks are started)."""
    code = main()
    # At its end the interpreter would walk every object torch and DeepSpeed made, seconds for
    # each rank of each job; the work is done (files closed, process group left), so frozen
    # objects are left to the process's exit instead.
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    console_main()
