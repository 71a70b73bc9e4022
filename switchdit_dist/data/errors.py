"""Errors raised for bad shards and samples."""

from __future__ import annotations

from switchdit_dist.errors import UserError


class DataError(UserError):
    """A bad shard or sample. ``str()`` names the shard and, when known, the sample key."""

    def __init__(self, shard: str, key: str | None, problem: str):
        self.shard = shard
        self.key = key
        self.problem = problem
        where = f"{shard}: sample '{key}'" if key is not None else shard
        super().__init__(f"{where}: {problem}")

    def __reduce__(self):  # crosses process boundaries from data workers
        return (DataError, (self.shard, self.key, self.problem))
