"""SVHN cropped digits from the official ``{train,test,extra}_32x32.mat`` files (read with scipy)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

__all__ = ["load_svhn"]


def load_svhn(root: str | os.PathLike, split: str) -> tuple[np.ndarray, np.ndarray]:
    """SVHN cropped digits from ``{split}_32x32.mat`` in ``root`` (split: train, test or extra). Label 10
    (digit 0 in the release) becomes 0. Returns images uint8 ``(N, 32, 32, 3)`` and labels int64."""
    if split not in ("train", "test", "extra"):
        raise ValueError(f"SVHN split must be train, test or extra, got {split!r}")
    path = Path(root).expanduser() / f"{split}_32x32.mat"
    if not path.is_file():
        raise FileNotFoundError(f"SVHN file {path} not found")
    try:
        from scipy.io import loadmat
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise RuntimeError(
            "reading SVHN .mat files needs scipy, which is not installed: `pip install scipy`"
        ) from e
    mat = loadmat(str(path))
    images = np.ascontiguousarray(np.asarray(mat["X"], dtype=np.uint8).transpose(3, 0, 1, 2))
    labels = np.asarray(mat["y"], dtype=np.int64).reshape(-1)
    labels[labels == 10] = 0
    return images, labels
