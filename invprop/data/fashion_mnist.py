"""Fashion-MNIST from the IDX files of Debian's ``dataset-fashion-mnist`` (or any folder holding them)."""

from __future__ import annotations

import gzip
import os
import subprocess
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
    with opener(path, "rb") as f:
        data = f.read()
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
        raise FileNotFoundError(
            f"Fashion-MNIST {split} IDX files not found (looked in: {where}). "
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
    return images, labels.astype(np.int64)
