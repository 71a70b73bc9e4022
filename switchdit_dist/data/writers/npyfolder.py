"""``switchdit prepare npy``: repack precomputed latents (``.npy`` files) into shards.

Input: every ``*.npy`` below ``--src`` (sorted by path), each one latent ``[C, H, W]`` or a batch
``[N, C, H, W]`` (float16 or float32, all the same shape). Labels, one per latent, from:

* class subfolders (default): ``SRC/<class name>/...npy``; classes are the sorted folder names
  (``--num-classes`` must then equal their number: with a folder missing, positions would not be
  class ids);
* ``--labels DIR``: a ``.npy`` file at the same relative path in DIR holding the label(s)
  (a scalar or ``[N]`` integers; the layout fast-DiT's feature extraction writes);
* ``--labels FILE.json``: ``{"relative/path.npy": label or [labels], ...}``.

The latents are copied as they are (optionally cast with ``--dtype``); ``--scale-factor`` and
``--vae`` only record what the producer already applied. Keys are the running sample number
(``00000000``...); the source file and row are kept in each sample's ``json``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from switchdit_dist.data.writers.shardset import SampleRecord, ShardSetResult, ShardSetSpec, write_shard_set
from switchdit_dist.errors import UserError


@dataclass
class NpyOptions:
    src: str
    out: str
    labels: str = ""
    num_classes: int = 0
    scale_factor: float = 1.0
    vae: str = "unknown"
    samples_per_shard: int = 1000
    dtype: str = "keep"


def _open(path: Path) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: not a readable .npy array ({err})") from None


def _labels_for(
    rel: Path, rows: int, opts: NpyOptions, table: dict | None, class_index: dict[str, int]
) -> list[int]:
    if not opts.labels:
        return [class_index[rel.parts[0]]] * rows
    if table is not None:
        if rel.as_posix() not in table:
            raise UserError(f"--labels {opts.labels}: no entry for '{rel.as_posix()}'")
        value = table[rel.as_posix()]
        values = value if isinstance(value, list) else [value]
    else:
        label_path = Path(opts.labels) / rel
        if not label_path.is_file():
            raise UserError(f"--labels {opts.labels}: no label file {label_path} for {rel.as_posix()}")
        values = np.atleast_1d(_open(label_path)).tolist()
    if len(values) != rows or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise UserError(f"labels of {rel.as_posix()}: expected {rows} integer(s), got {values!r}")
    return values


def write_npy_folder(opts: NpyOptions, log=print) -> ShardSetResult:
    root = Path(opts.src)
    if not root.is_dir():
        raise UserError(f"--src: {opts.src} is not a folder")
    files = sorted(p.relative_to(root) for p in root.rglob("*.npy") if p.is_file())
    if not files:
        raise UserError(f"--src: no .npy files under {opts.src}")
    table = None
    class_names = None
    class_index: dict[str, int] = {}
    if not opts.labels:
        flat = [f for f in files if len(f.parts) == 1]
        if flat:
            raise UserError(
                f"--src: {flat[0]} is not in a class subfolder; put files in SRC/<class>/ or give --labels"
            )
        class_names = sorted({f.parts[0] for f in files})
        class_index = {name: i for i, name in enumerate(class_names)}
        if opts.num_classes and opts.num_classes != len(class_names):
            # Labels are positions among the folders present: with a class missing they would not
            # be the class ids meant (and would differ between two sets with different gaps).
            raise UserError(
                f"--num-classes {opts.num_classes}: {opts.src} has {len(class_names)} class folders, "
                f"labelled 0..{len(class_names) - 1} in sorted order; leave out --num-classes to use "
                "them as the classes, or give each file's class id with --labels (a JSON file or a "
                "folder of label files)"
            )
    elif opts.labels.endswith(".json"):
        try:
            table = json.loads(Path(opts.labels).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise UserError(f"--labels: cannot read {opts.labels} as JSON ({err})") from None
        if not isinstance(table, dict):
            raise UserError(f"--labels {opts.labels}: expected an object mapping file name -> label(s)")
    elif not Path(opts.labels).is_dir():
        raise UserError(f"--labels: {opts.labels} is neither a folder of .npy label files nor a .json file")

    entries: list[tuple[int, int]] = []  # (file, row)
    labels: list[int] = []
    shape = dtype = None
    for f_index, rel in enumerate(files):
        array = _open(root / rel)
        if array.ndim not in (3, 4):
            raise UserError(f"{root / rel}: shape {list(array.shape)}; expected [C, H, W] or [N, C, H, W]")
        item_shape = tuple(array.shape[-3:])
        rows = array.shape[0] if array.ndim == 4 else 1
        if shape is None:
            shape, dtype = item_shape, array.dtype
        if item_shape != shape:
            raise UserError(
                f"{root / rel}: latents of shape {list(item_shape)}, but {files[0]} has {list(shape)}"
            )
        if array.dtype.name not in ("float16", "float32"):
            raise UserError(f"{root / rel}: dtype {array.dtype.name}; expected float16 or float32")
        labels.extend(_labels_for(rel, rows, opts, table, class_index))
        entries.extend((f_index, r) for r in range(rows))
    num_classes = opts.num_classes or (len(class_names) if class_names else max(labels) + 1)
    if min(labels) < 0 or max(labels) >= num_classes:
        raise UserError(
            f"labels range over [{min(labels)}, {max(labels)}], outside [0, {num_classes}) (--num-classes)"
        )
    assert shape is not None and dtype is not None

    def produce(start: int, stop: int) -> Iterator[SampleRecord]:
        opened: dict[int, np.ndarray] = {}
        for n in range(start, stop):
            f_index, row = entries[n]
            if f_index not in opened:
                opened = {f_index: _open(root / files[f_index])}
            array = opened[f_index]
            latent = np.asarray(array[row] if array.ndim == 4 else array)
            yield f"{n:08d}", latent, labels[n], {"file": files[f_index].as_posix(), "row": row}

    spec = ShardSetSpec(
        total=len(entries),
        samples_per_shard=opts.samples_per_shard,
        latent_shape=(int(shape[0]), int(shape[1]), int(shape[2])),
        latent_dtype=dtype.name if opts.dtype == "keep" else opts.dtype,
        num_classes=num_classes,
        scale_factor=opts.scale_factor,
        vae=opts.vae,
        class_names=class_names,
        source={"kind": "npy", "files": len(files), "labels": opts.labels or "subfolders"},
    )
    log(f"{len(files)} files -> {spec.total} latents {list(spec.latent_shape)}, {num_classes} classes")
    return write_shard_set(opts.out, spec, produce, log=log)
