"""Streaming tar reading and sample decoding, written for throughput and precise error messages.

Python's ``tarfile`` in stream mode managed about 10k samples/s here, which with decoding left
little headroom over the 5k samples/s a data worker should deliver; reading the 512-byte headers
directly is several times faster and lets every error say which shard, which byte and which key.
Handles the ustar members webdataset writes plus GNU long names and pax headers, so shards made
by plain ``tar`` read as well.
"""

from __future__ import annotations

import ast
import posixpath
from collections.abc import Iterator
from typing import IO

import numpy as np

from switchdit_dist.data.errors import DataError
from switchdit_dist.data.format import CLASS_EXT, LATENT_EXT, is_local, local_path

BLOCK = 512
ZERO_BLOCK = bytes(BLOCK)
READ_BUFFER = 1 << 20


def open_shard(url: str) -> IO[bytes]:
    try:
        if is_local(url):
            return open(local_path(url), "rb", buffering=READ_BUFFER)
        from webdataset.gopen import gopen

        return gopen(url, "rb", bufsize=READ_BUFFER)
    except OSError as err:
        raise DataError(url, None, f"cannot open shard ({err.strerror or err})") from None


def _number(field: bytes) -> int:
    if field[0] & 0x80:  # GNU base-256 for sizes beyond 8 GiB
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0]
    return int(text, 8) if text.strip() else 0


def _checksum_ok(header: bytes, stored: int) -> bool:
    """The ustar checksum: the byte sum with the checksum field counted as spaces.

    Summing 512 bytes in Python costs more than the rest of a member's handling, so the common
    case is checked modulo 255 (a number's base-256 digit sum is congruent to it modulo 255, and
    one big-integer conversion computes it); only a mismatch there pays for the exact sums, which
    also accept the signed-char variant some old writers used."""
    field_sum = sum(header[148:156])
    if (int.from_bytes(header, "big") - field_sum + 256 - stored) % 255 == 0:
        return True
    unsigned = sum(header) - field_sum + 256
    signed = unsigned - 256 * sum(1 for b in header[:148] + header[156:] if b >= 128)
    return stored in (unsigned, signed)


def _pax_path(data: bytes) -> str | None:
    path = None
    pos = 0
    while pos < len(data):
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        if key == b"path":
            path = value.decode("utf-8")
        pos += length
    return path


def iter_members(stream: IO[bytes], shard: str) -> Iterator[tuple[str, bytes]]:
    """(name, content) for every regular file of the tar stream, in order."""
    offset = 0
    next_name: str | None = None  # from a GNU long-name or pax header, applies to the next member
    while True:
        header = stream.read(BLOCK)
        if not header:
            return  # no end-of-archive blocks; the sample count check catches a cut at a boundary
        if len(header) < BLOCK:
            raise DataError(shard, None, f"truncated tar: the header at byte {offset} is cut short")
        if header == ZERO_BLOCK:
            return
        try:
            stored = _number(header[148:156])
            size = _number(header[124:136])
        except ValueError:
            raise DataError(shard, None, f"corrupt tar header at byte {offset} (not a tar file?)") from None
        if not _checksum_ok(header, stored):
            raise DataError(
                shard, None, f"corrupt tar header at byte {offset} (checksum mismatch; not a tar file?)"
            )
        kind = header[156:157]
        name = header[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
        if header[257:262] == b"ustar" and header[345] != 0:
            name = header[345:500].split(b"\0", 1)[0].decode("utf-8", "replace") + "/" + name
        data = stream.read(size)
        pad = -size % BLOCK
        got = len(data) + (len(stream.read(pad)) if pad and len(data) == size else 0)
        if got < size + pad:
            raise DataError(
                shard,
                None,
                f"truncated tar: member '{name}' at byte {offset} is cut short ({got} of {size + pad} bytes)",
            )
        offset += BLOCK + size + pad
        if kind == b"L":
            next_name = data.split(b"\0", 1)[0].decode("utf-8", "replace")
        elif kind == b"x":
            next_name = _pax_path(data) or next_name
        elif kind in (b"0", b"\0", b"7"):
            yield (next_name or name), data
            next_name = None
        else:  # directories, links, pax globals: not sample content
            next_name = None


def split_name(name: str) -> tuple[str, str]:
    """webdataset's key/extension split: the extension starts at the first dot of the file name."""
    folder, base = posixpath.split(name)
    stem, dot, ext = base.partition(".")
    return (posixpath.join(folder, stem) if folder else stem), ext


def iter_raw_samples(url: str) -> Iterator[dict[str, bytes | str]]:
    """Group consecutive members by key into ``{"__key__": key, ext: bytes, ...}``."""
    with open_shard(url) as stream:
        sample: dict[str, bytes | str] | None = None
        for name, data in iter_members(stream, url):
            key, ext = split_name(name)
            base = posixpath.basename(name)
            if base.startswith("__") and base.endswith("__"):
                continue  # webdataset metadata members such as __key__
            if sample is None or sample["__key__"] != key:
                if sample is not None:
                    yield sample
                sample = {"__key__": key}
            if ext in sample:
                raise DataError(url, key, f"member '{name}' appears twice")
            sample[ext] = data
        if sample is not None:
            yield sample


class SampleDecoder:
    """Turns a raw sample into (key, latent array, class) and checks it against the manifest."""

    def __init__(self, latent_shape: tuple[int, ...], latent_dtype: str, num_classes: int):
        self.shape = tuple(latent_shape)
        self.dtype = np.dtype(latent_dtype)
        self.num_classes = num_classes
        self._headers: dict[bytes, tuple[np.dtype, tuple[int, ...], bool]] = {}

    def _parse_header(self, header: bytes, shard: str, key: str) -> tuple[np.dtype, tuple[int, ...], bool]:
        try:
            info = ast.literal_eval(header.decode("latin1"))
            dtype = np.dtype(info["descr"])
            shape = tuple(int(d) for d in info["shape"])
            fortran = bool(info["fortran_order"])
        except Exception:  # any malformed header is the same problem for the user
            raise DataError(shard, key, f"{LATENT_EXT} has a malformed .npy header") from None
        if dtype.hasobject:
            raise DataError(shard, key, f"{LATENT_EXT} holds Python objects; expected {self.dtype.name}")
        result = (dtype, shape, fortran)
        if len(self._headers) < 64:  # every sample of a data set shares one header: cache it
            self._headers[header] = result
        return result

    def latent(self, data: bytes, shard: str, key: str) -> np.ndarray:
        if data[:6] != b"\x93NUMPY" or len(data) < 10:
            raise DataError(shard, key, f"{LATENT_EXT} is not a .npy file")
        if data[6] == 1:
            start, length = 10, int.from_bytes(data[8:10], "little")
        else:
            start, length = 12, int.from_bytes(data[8:12], "little")
        header = data[start : start + length]
        parsed = self._headers.get(header) or self._parse_header(header, shard, key)
        dtype, shape, fortran = parsed
        if shape != self.shape:
            raise DataError(
                shard, key, f"{LATENT_EXT} has shape {list(shape)}; the manifest says {list(self.shape)}"
            )
        if dtype != self.dtype:
            raise DataError(
                shard, key, f"{LATENT_EXT} has dtype {dtype.name}; the manifest says {self.dtype.name}"
            )
        count = int(np.prod(shape))
        body = start + length
        if len(data) - body != count * dtype.itemsize:
            raise DataError(
                shard,
                key,
                f"{LATENT_EXT} holds {len(data) - body} data bytes, expected "
                f"{count * dtype.itemsize} for {list(shape)} {dtype.name}",
            )
        array = np.frombuffer(data, dtype=dtype, count=count, offset=body)
        array = array.reshape(shape[::-1]).T if fortran else array.reshape(shape)
        if not np.isfinite(array).all():
            bad = int(np.size(array) - np.isfinite(array).sum())
            raise DataError(shard, key, f"{LATENT_EXT} contains {bad} NaN or Inf values")
        return array

    def __call__(self, raw: dict[str, bytes | str], shard: str) -> tuple[str, np.ndarray, int]:
        key = str(raw["__key__"])
        data = raw.get(LATENT_EXT)
        if data is None:
            present = sorted(k for k in raw if k != "__key__")
            raise DataError(
                shard, key, f"no '{LATENT_EXT}' member (found: {', '.join(present) or 'nothing'})"
            )
        latent = self.latent(data, shard, key)  # type: ignore[arg-type]
        text = raw.get(CLASS_EXT)
        if text is None:
            raise DataError(shard, key, f"no '{CLASS_EXT}' member (the integer class as text)")
        try:
            cls = int(text)  # type: ignore[arg-type]
        except ValueError:
            raise DataError(
                shard, key, f"'{CLASS_EXT}' is {bytes(text)[:20]!r}; expected an integer"
            ) from None
        if not 0 <= cls < self.num_classes:
            raise DataError(
                shard, key, f"class {cls} is outside [0, {self.num_classes}) (manifest num_classes)"
            )
        return key, latent, cls
