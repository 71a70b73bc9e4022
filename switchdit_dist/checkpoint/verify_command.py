"""``switchdit verify RUN_DIR|CHECKPOINT_DIR``: check checkpoints against their manifests.

A run directory: every checkpoint under ``checkpoints/``, newest first, and which one a resume
would start from; one ``step_*`` directory: that checkpoint. Sizes and checksums of every file
(``--sizes-only``: sizes). Exit code 0 when everything checked is intact, 1 when anything is
damaged or incomplete.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from switchdit_dist.checkpoint import store
from switchdit_dist.checkpoint.manifest import Damage, Damaged
from switchdit_dist.checkpoint.schema import CheckpointMeta
from switchdit_dist.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="a run directory, its checkpoints/ folder or one step_* directory")
    parser.add_argument("--sizes-only", action="store_true", help="check file sizes, not checksums")


def checkpoints_of(path: Path) -> list[Path]:
    """The checkpoint directories ``path`` names, newest first."""
    if not path.is_dir():
        raise UserError(f"{path}: no such directory")
    folder = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    found = store.step_dirs(folder)
    if found:
        return list(reversed(found))
    if (path / "meta.json").is_file() or path.name.startswith("step_"):
        return [path]
    raise UserError(f"{path}: neither a run directory (with checkpoints/) nor a checkpoint directory")


def findings(path: Path, full: bool) -> list[Damage]:
    try:
        CheckpointMeta.read(path)
    except UserError as err:
        return [Damage("meta.json", str(err))]
    try:
        return store.verify(path, full)
    except Damaged as err:
        return err.damages


def run(args: argparse.Namespace) -> int:
    path = Path(args.path)
    full = not args.sizes_only
    bad = 0
    intact: list[Path] = []
    for checkpoint in checkpoints_of(path):
        problems = findings(checkpoint, full)
        if problems:
            bad += 1
            print(f"DAMAGED  {checkpoint}")
            for problem in problems:
                print(f"         {problem}")
        else:
            intact.append(checkpoint)
            print(f"ok       {checkpoint} ({'sizes and checksums' if full else 'sizes'})")
    if len(intact) + bad > 1:
        newest = intact[0].name if intact else None
        print(f"a resume with checkpoint.fallback=previous starts from: {newest or 'nothing intact'}")
    return 1 if bad else 0
