"""Fashion-MNIST from the IDX files of Debian's ``dataset-fashion-mnist`` (or any folder holding them)."""

from __future__ import annotations

import gzip
import os
import struct
import subprocess
import zlib
from pathlib import Path

import numpy as np

DEBIAN_PACKAGE = "dataset-fashion-mnist"
DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")
SPLIT_SIZES = {"train": 60000, "test": 10000}
NUM_CLASSES = 10
_PREFIX = {"train": "train", "test": "t10k"}
# IDX type byte -> numpy dtype (big-endian where it matters).
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Parse one IDX file (optionally gzipped) into a numpy array of its declared shape."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:  # truncated or not gzip at all
        raise ValueError(f"{path}: not a readable gzip file ({exc}); replace it with a good copy") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path}: not an IDX file (bad magic)")
    dtype = np.dtype(_IDX_DTYPES[data[2]]) if data[2] in _IDX_DTYPES else None
    if dtype is None:
        raise ValueError(f"{path}: unknown IDX element type 0x{data[2]:02x}")
    ndim = data[3]
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    count = int(np.prod(shape)) if shape else 1
    if len(data) != header + count * dtype.itemsize:
        raise ValueError(f"{path}: size {len(data)} does not match header shape {shape}")
    arr = np.frombuffer(data, dtype=dtype, offset=header, count=count).reshape(shape)
    return arr.astype(dtype.newbyteorder("="), copy=True)  # own, writable, native byte order


def _idx_header(path: Path) -> tuple[np.dtype, tuple[int, ...], int]:
    """(dtype, shape, bytes the whole file should have) from the first bytes of an IDX file."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            head = f.read(4)
            if len(head) < 4 or head[0] != 0 or head[1] != 0 or head[2] not in _IDX_DTYPES:
                raise ValueError(f"{path}: not an IDX file (bad magic); replace it with a good copy")
            dims = f.read(4 * head[3])
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise ValueError(f"{path}: not a readable gzip file ({exc}); replace it with a good copy") from None
    if len(dims) != 4 * head[3]:
        raise ValueError(f"{path}: IDX header cut short; replace it with a good copy")
    shape = tuple(int.from_bytes(dims[4 * i : 4 * i + 4], "big") for i in range(head[3]))
    dtype = np.dtype(_IDX_DTYPES[head[2]])
    return dtype, shape, 4 + 4 * len(shape) + int(np.prod(shape)) * dtype.itemsize


def _stored_size(path: Path) -> int:
    """Uncompressed size without decompressing: a gzip trailer's ISIZE (size mod 2**32) or the file size."""
    if path.suffix != ".gz":
        return path.stat().st_size
    with open(path, "rb") as f:
        f.seek(-4, os.SEEK_END)
        return struct.unpack("<I", f.read(4))[0]


def check_split(split: str, root: str | os.PathLike | None = None) -> int:
    """Images in ``split``, after checking what can be checked cheaply up front: both files found, their IDX
    headers, sizes against the headers, matching counts, and every label in [0, NUM_CLASSES)."""
    img_path, lbl_path = find_files(split, root)
    dtype, shape, expected = _idx_header(img_path)
    if dtype != np.uint8 or len(shape) != 3:
        raise ValueError(f"{img_path}: holds {dtype} of shape {shape}, not uint8 images (N, H, W)")
    if _stored_size(img_path) != expected % 2**32 and img_path.suffix == ".gz":
        read_idx(img_path)  # the trailer disagrees: read it all for the exact complaint
    if _stored_size(img_path) != expected % 2**32:
        raise ValueError(f"{img_path}: size does not match header shape {shape}; replace it with a good copy")
    labels = read_idx(lbl_path)  # small: read it whole to check every label
    if labels.ndim != 1 or len(labels) != shape[0]:
        raise ValueError(f"{lbl_path}: {labels.shape} labels for the {shape[0]} images of {img_path.name}")
    bad = (labels < 0) | (labels >= NUM_CLASSES)
    if bad.any():
        raise ValueError(f"{lbl_path}: label {int(labels[bad][0])} at index {int(np.flatnonzero(bad)[0])} is "
                         f"outside 0..{NUM_CLASSES - 1}")
    return shape[0]


def _candidate_dirs(root: str | os.PathLike | None) -> list[Path]:
    if root is not None:
        r = Path(root).expanduser()
        # Also accept torchvision's download layout under the given root.
        return [r, r / "fashion-mnist", r / "FashionMNIST" / "raw"]
    dirs = [DEFAULT_ROOT]
    try:  # the package may install elsewhere on other releases: ask dpkg where its files are
        out = subprocess.run(["dpkg", "-L", DEBIAN_PACKAGE], capture_output=True, text=True, timeout=10)
        for line in out.stdout.splitlines():
            if line.endswith("-idx3-ubyte.gz") or line.endswith("-idx3-ubyte"):
                dirs.append(Path(line).parent)
    except (OSError, subprocess.SubprocessError):
        pass
    return dirs


def _find_file(dirs: list[Path], stem: str) -> Path | None:
    for d in dirs:
        for name in (stem, stem + ".gz"):
            if (d / name).is_file():
                return d / name
    return None


def find_files(split: str, root: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """Paths of the (images, labels) IDX files of ``split`` ("train" or "test")."""
    if split not in _PREFIX:
        raise ValueError(f"unknown Fashion-MNIST split {split!r}; expected 'train' or 'test'")
    dirs = _candidate_dirs(root)
    images = _find_file(dirs, f"{_PREFIX[split]}-images-idx3-ubyte")
    labels = _find_file(dirs, f"{_PREFIX[split]}-labels-idx1-ubyte")
    if images is None or labels is None:
        where = ", ".join(str(d) for d in dirs)
        missing = " and ".join(f"{_PREFIX[split]}-{kind}[.gz]" for kind, found in
                               (("images-idx3-ubyte", images), ("labels-idx1-ubyte", labels)) if found is None)
        raise FileNotFoundError(
            f"Fashion-MNIST {split} IDX files not found: no {missing} (looked in: {where}). "
            f"Install them with `apt-get install {DEBIAN_PACKAGE}` or set data.root to a folder holding "
            f"{_PREFIX[split]}-images-idx3-ubyte[.gz] and {_PREFIX[split]}-labels-idx1-ubyte[.gz]."
        )
    return images, labels


def load_fashion_mnist(split: str, root: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(images uint8 (N, 28, 28), labels int64 (N,))`` exactly as stored in the IDX files."""
    img_path, lbl_path = find_files(split, root)
    images = read_idx(img_path)
    labels = read_idx(lbl_path)
    if images.dtype != np.uint8 or images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"unexpected Fashion-MNIST arrays: {images.shape} {images.dtype}, {labels.shape}")
    if len(labels) and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise ValueError(f"{lbl_path}: labels outside 0..{NUM_CLASSES - 1}")
    return images, labels.astype(np.int64)
