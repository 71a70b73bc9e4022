"""The ``data`` section of a run config and how its shard specification is resolved.

``shards`` follows webdataset's conventions: a brace pattern (``dir/train-{000000..000099}.tar``),
several patterns joined by ``::``, a list, ``http(s)://``/``s3://``... URLs, or ``pipe:`` commands.
Two shortcuts: a folder or a ``manifest.json`` path stands for every shard its manifest lists.
Per-shard sample counts always come from a manifest: by default ``manifest.json`` in the folder
of each shard (URLs included); ``manifest`` overrides that (needed for ``pipe:`` commands).
"""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass, replace

from switchdit_dist.data.format import (
    MANIFEST_NAME,
    Manifest,
    is_local,
    local_path,
    read_manifest,
    shard_name,
)
from switchdit_dist.errors import UserError

ON_ERROR_CHOICES = ("raise", "skip")
SHARDS_EXPECTED = (
    "a brace pattern like dir/train-{000000..000009}.tar, a list of shards, URLs or pipe: commands, "
    "a folder, or a manifest.json path"
)


@dataclass
class DataConfig:
    shards: str | list[str] = ""
    manifest: str = ""  # "" = manifest.json beside the shards
    validation_shards: str | list[str] = ""  # "" = no validation set
    num_workers: int = 0  # reader processes per rank; 0 reads in the training process
    shuffle_buffer: int = 0  # samples per reader; 0 = shard order only
    shuffle_shards: bool = True  # a new shard order every epoch, from (seed, epoch)
    seed: int = 0
    on_error: str = "raise"  # or "skip": skip bad samples/shards and count them
    max_errors: int = 100  # with on_error=skip: stop once more than this many were skipped
    prefetch: int = 4  # pieces of up to 64 samples each reader may queue ahead


@dataclass
class ShardSet:
    """Resolved shards with their sample counts and the properties every manifest agreed on."""

    urls: list[str]
    counts: list[int]
    manifest: Manifest  # the first manifest; shape, dtype, scale and VAE are the same in all
    num_classes: int  # the largest over the manifests
    manifest_urls: list[str]

    @property
    def total_samples(self) -> int:
        return sum(self.counts)


def validate(config: DataConfig, *, check_files: bool = True) -> None:
    """Check every key; with ``check_files`` also that the shards and their manifests exist."""
    for key in ("num_workers", "shuffle_buffer", "seed", "max_errors"):
        value = getattr(config, key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise UserError(f"data.{key}: expected an integer >= 0, got {value!r}")
    if not isinstance(config.prefetch, int) or config.prefetch < 1:
        raise UserError(f"data.prefetch: expected an integer >= 1, got {config.prefetch!r}")
    if config.on_error not in ON_ERROR_CHOICES:
        raise UserError(f"data.on_error: expected one of {list(ON_ERROR_CHOICES)}, got {config.on_error!r}")
    if not isinstance(config.manifest, str):
        raise UserError(f"data.manifest: expected a path or URL (string), got {config.manifest!r}")
    _check_spec_type(config.shards, "data.shards", allow_empty=False)
    _check_spec_type(config.validation_shards, "data.validation_shards", allow_empty=True)
    if check_files:
        resolve_shards(config.shards, config.manifest, key="data.shards")
        if config.validation_shards:
            resolve_shards(config.validation_shards, "", key="data.validation_shards")


def validation_config(config: DataConfig) -> DataConfig | None:
    """The config that reads ``validation_shards`` (fixed order), or None when there are none."""
    if not config.validation_shards:
        return None
    return replace(
        config,
        shards=config.validation_shards,
        manifest="",
        validation_shards="",
        shuffle_shards=False,
        shuffle_buffer=0,
    )


def _check_spec_type(spec: object, key: str, allow_empty: bool) -> None:
    if isinstance(spec, str):
        if not spec and not allow_empty:
            raise UserError(f"{key}: no shards given; expected {SHARDS_EXPECTED}")
        return
    if isinstance(spec, (list, tuple)) and all(isinstance(s, str) and s for s in spec):
        if not spec and not allow_empty:
            raise UserError(f"{key}: the list is empty; expected {SHARDS_EXPECTED}")
        return
    raise UserError(f"{key}: expected a string or a list of strings ({SHARDS_EXPECTED}), got {spec!r}")


def _url_dirname(url: str) -> str:
    return os.path.dirname(local_path(url)) if is_local(url) else posixpath.dirname(url)


def _join(folder: str, name: str) -> str:
    if not folder:
        return name
    return os.path.join(folder, name) if "://" not in folder else f"{folder.rstrip('/')}/{name}"


def _expand(spec: str) -> list[str]:
    """One string spec -> shard URLs; folders and manifest paths become the shards they list."""
    from webdataset.shardlists import expand_urls

    urls: list[str] = []
    for part in expand_urls(spec):
        if part.endswith(".json") or (is_local(part) and os.path.isdir(local_path(part))):
            manifest_url = part if part.endswith(".json") else os.path.join(local_path(part), MANIFEST_NAME)
            folder = _url_dirname(manifest_url)
            urls.extend(_join(folder, s.name) for s in read_manifest(manifest_url).shards)
        else:
            urls.append(part)
    return urls


def resolve_shards(
    spec: str | list[str], manifest: str = "", *, key: str = "data.shards", check_files: bool = True
) -> ShardSet:
    """Expand ``spec`` into shard URLs and look up each shard's sample count in its manifest."""
    _check_spec_type(spec, key, allow_empty=False)
    urls: list[str] = []
    for item in [spec] if isinstance(spec, str) else spec:
        try:
            urls.extend(_expand(item))
        except UserError as err:
            raise UserError(f"{key}: {err}") from None
    if not urls:
        raise UserError(f"{key}: {spec!r} expands to no shards; expected {SHARDS_EXPECTED}")
    if len(set(urls)) != len(urls):
        dup = next(u for u in urls if urls.count(u) > 1)
        raise UserError(f"{key}: shard {dup} is listed twice")
    if check_files:
        missing = [u for u in urls if is_local(u) and not os.path.isfile(local_path(u))]
        if missing:
            raise UserError(
                f"{key}: {len(missing)} of {len(urls)} shard files do not exist, e.g. {missing[0]} "
                f"(expected {SHARDS_EXPECTED})"
            )

    manifests: dict[str, Manifest] = {}
    counts: list[int] = []
    order: list[str] = []
    for url in urls:
        if manifest:
            where = manifest
        elif url.startswith("pipe:"):
            raise UserError(
                f"{key}: {url!r} is a pipe: command, so no manifest.json can be found beside it; "
                f"set data.manifest to the manifest's path or URL"
            )
        else:
            where = _join(_url_dirname(url), MANIFEST_NAME)
        if where not in manifests:
            if is_local(where) and not os.path.isfile(local_path(where)):
                raise UserError(
                    f"{key}: no manifest for shard {url}: {where} does not exist (write one with "
                    f"`switchdit prepare manifest --shards ...`, or set data.manifest)"
                )
            try:
                manifests[where] = read_manifest(where)
            except UserError as err:
                raise UserError(f"{key}: {err}") from None
            order.append(where)
        table = {s.name: s.samples for s in manifests[where].shards}
        name = shard_name(url)
        if name not in table:
            raise UserError(f"{key}: shard {url} is not listed in its manifest {where}")
        counts.append(table[name])

    first = manifests[order[0]]
    for where in order[1:]:
        other = manifests[where]
        for field in ("latent_shape", "latent_dtype", "scale_factor", "vae"):
            if getattr(other, field) != getattr(first, field):
                raise UserError(
                    f"{key}: manifests disagree on {field}: {order[0]} has {getattr(first, field)!r}, "
                    f"{where} has {getattr(other, field)!r}"
                )
    return ShardSet(
        urls=urls,
        counts=counts,
        manifest=first,
        num_classes=max(m.num_classes for m in manifests.values()),
        manifest_urls=order,
    )
