"""Integrity: ``manifest.json`` records every file of a checkpoint with its size and checksum.

The checksum is xxh3-128 (the ``xxhash`` package): a non-cryptographic hash made to catch
corruption, several GB/s on one core, so checking a checkpoint costs about as much as reading it.
Sizes are checked at every resume (a ``stat`` per file); checksums with ``checkpoint.verify=full``
and by ``switchdit verify``. A damaged checkpoint is reported per file: missing, truncated, longer
than written, or checksum mismatch.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from switchdit_dist.checkpoint.schema import COMPLETE, FORMAT_VERSION, MANIFEST
from switchdit_dist.errors import UserError

ALGORITHM = "xxh3_128"
_CHUNK = 8 << 20


def file_checksum(path: Path) -> str:
    import xxhash

    digest = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class FileEntry:
    size: int
    checksum: str


def describe(path: Path) -> FileEntry:
    return FileEntry(size=path.stat().st_size, checksum=file_checksum(path))


@dataclass
class Manifest:
    step: int
    files: dict[str, FileEntry]  # name relative to the checkpoint directory -> entry
    algorithm: str = ALGORITHM
    format_version: int = FORMAT_VERSION

    def write(self, directory: Path) -> None:
        from switchdit_dist.checkpoint.store import atomic_write_text

        data = {**asdict(self), "files": {k: asdict(v) for k, v in sorted(self.files.items())}}
        atomic_write_text(Path(directory) / MANIFEST, json.dumps(data, indent=1, sort_keys=True))

    @classmethod
    def read(cls, directory: Path) -> Manifest:
        file = Path(directory) / MANIFEST
        if not file.is_file():
            raise Damaged(directory, [Damage(MANIFEST, "missing")])
        try:
            data = json.loads(file.read_text())
            files = {name: FileEntry(**entry) for name, entry in data["files"].items()}
            manifest = cls(step=int(data["step"]), files=files, algorithm=data["algorithm"])
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as err:
            raise Damaged(
                directory, [Damage(MANIFEST, f"unreadable ({type(err).__name__}: {err})")]
            ) from None
        if manifest.algorithm != ALGORITHM:
            raise UserError(f"{file}: checksums use {manifest.algorithm!r}; this version knows {ALGORITHM}")
        return manifest


@dataclass(frozen=True)
class Damage:
    file: str
    problem: str

    def __str__(self) -> str:
        return f"{self.file}: {self.problem}"


class Damaged(UserError):
    """A checkpoint whose files do not match its manifest (or that has no manifest)."""

    def __init__(self, directory: Path, damages: list[Damage], hint: str = ""):
        self.directory = Path(directory)
        self.damages = damages
        text = f"checkpoint {directory} is damaged: " + "; ".join(str(d) for d in damages)
        super().__init__(text + (f" ({hint})" if hint else ""))


def check_sizes(directory: Path, manifest: Manifest) -> list[Damage]:
    damages = []
    for name, entry in sorted(manifest.files.items()):
        path = Path(directory) / name
        if not path.is_file():
            damages.append(Damage(name, "missing"))
            continue
        size = path.stat().st_size
        if size < entry.size:
            damages.append(Damage(name, f"truncated: {size} bytes, {entry.size} written"))
        elif size > entry.size:
            damages.append(Damage(name, f"longer than written: {size} bytes, {entry.size} written"))
    return damages


def check_checksums(directory: Path, manifest: Manifest, names: list[str]) -> list[Damage]:
    """Checksums of ``names`` (files whose sizes already match)."""
    damages = []
    for name in names:
        got = file_checksum(Path(directory) / name)
        if got != manifest.files[name].checksum:
            damages.append(
                Damage(
                    name, f"checksum mismatch ({ALGORITHM} {got}, {manifest.files[name].checksum} written)"
                )
            )
    return damages


def share(names: list[str], rank: int, world_size: int) -> list[str]:
    """Rank ``rank``'s share of ``names`` when ``world_size`` ranks split the hashing."""
    return sorted(names)[rank::world_size]


def unlisted(directory: Path, manifest: Manifest) -> list[str]:
    """Files in the directory the manifest does not know (besides itself and COMPLETE)."""
    known = set(manifest.files) | {MANIFEST, COMPLETE}
    return sorted(p.name for p in Path(directory).iterdir() if p.is_file() and p.name not in known)
