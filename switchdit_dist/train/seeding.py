"""Seeds derived from (seed, rank, step, ...): every random draw of a step is a pure function of
where it happens, so a resumed run repeats the uninterrupted one without replaying generators."""

from __future__ import annotations

import hashlib


def derive_seed(*parts: int) -> int:
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)
