"""What a cached ``.beton`` was written from, and whether it is still that file.

Beside each cached file ``x.beton`` lies ``x.beton.check.json``: a digest of its source files (names, sizes,
modification times), its sample count, its size and a CRC-32 of every ``CHUNK`` bytes. :func:`problem` says in a
few words why a file must not be used (sources edited, bytes overwritten, truncated, a header or index that does
not read back) or returns None. Files up to ``FULL_CHECK_BYTES`` have every chunk checked (about a second per GB);
larger ones their first and last chunks (header, allocation table) and ``SAMPLED_CHUNKS`` spread between them,
plus the header and index checks.
"""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from collections.abc import Iterable
from pathlib import Path

import numpy as np

__all__ = ["CHUNK", "fingerprint", "problem", "record_path", "write_record"]

CHUNK = 16 * 2**20
FULL_CHECK_BYTES = 4 * 2**30
SAMPLED_CHUNKS = 64


def record_path(beton: Path) -> Path:
    return beton.with_name(beton.name + ".check.json")


def fingerprint(files: Iterable[str | os.PathLike]) -> str:
    """A digest of each file's absolute name, size and modification time (ns), in the given order."""
    digest = hashlib.sha256()
    for name in files:
        st = os.stat(name)
        digest.update(f"{os.path.abspath(name)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _crc(fh, index: int) -> int:
    fh.seek(index * CHUNK)
    return zlib.crc32(fh.read(CHUNK))


def _chunks_to_check(count: int, size: int) -> list[int]:
    if size <= FULL_CHECK_BYTES or count <= SAMPLED_CHUNKS + 2:
        return list(range(count))
    spread = np.linspace(0, count - 1, SAMPLED_CHUNKS + 2).round().astype(int)
    return sorted(set(spread.tolist()))


def write_record(beton: Path, sources: str, samples: int) -> None:
    """Record `beton` as it is now (its sums read back from disk), atomically."""
    size = beton.stat().st_size
    with open(beton, "rb") as fh:
        sums = [_crc(fh, i) for i in range(-(-size // CHUNK))]
    record = {"sources": sources, "samples": int(samples), "size": size, "chunk": CHUNK, "crc32": sums}
    path = record_path(beton)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, path)


def _read_record(beton: Path) -> dict | None:
    try:
        record = json.loads(record_path(beton).read_text())
    except (OSError, ValueError):
        return None
    keys = {"sources", "samples", "size", "chunk", "crc32"}
    return record if isinstance(record, dict) and keys <= set(record) else None


def problem(beton: Path, sources: str) -> str | None:
    """Why `beton` must be written again (a few words), or None when it is the file its record describes and
    its sources are unchanged (`sources`: their :func:`fingerprint` now)."""
    record = _read_record(beton)
    if record is None:
        return "it has no record of what it was written from (an older version wrote it, or writing it stopped)"
    if record["sources"] != sources:
        return "its source files changed since it was written (names, sizes or modification times)"
    size = beton.stat().st_size
    if size != record["size"]:
        return f"it is {size} bytes, but was written with {record['size']} (truncated or overwritten)"
    chunk, sums = int(record["chunk"]), record["crc32"]
    if chunk != CHUNK or len(sums) != -(-size // CHUNK):
        return "its record does not match this version's checks"
    with open(beton, "rb") as fh:
        for i in _chunks_to_check(len(sums), size):
            if _crc(fh, i) != sums[i]:
                return (f"bytes {i * CHUNK}-{min(size, (i + 1) * CHUNK) - 1} differ from what was written "
                        "(the file was damaged)")
    return _header_problem(beton, int(record["samples"]))


def _header_problem(beton: Path, samples: int) -> str | None:
    from invprop.data.ffcv.compat import read_metadata

    try:
        count, tables = read_metadata(str(beton))
        index = np.asarray(tables["index"]).reshape(-1)
    except Exception as exc:  # noqa: BLE001 - any failure to read it back means the file is not usable
        return f"its header does not read back ({type(exc).__name__}: {' '.join(str(exc).split())})"
    if count != samples or not np.array_equal(index, np.arange(samples)):
        return f"its header or index is wrong ({count} samples, {samples} written)"
    return None
