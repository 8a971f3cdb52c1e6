"""CIFAR-10/100 from the official python-pickle release (``cifar-10-batches-py`` / ``cifar-100-python``)."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np

# Per-channel mean / std of the training splits (the values the CIFAR literature normalises with).
CIFAR_STATS = {
    10: ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    100: ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


# What the release's pickles (and numpy's own pickling of arrays) reference; anything else, os.system included,
# is refused before it is called: a data file is data, never code.
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
}


class UnsafeDataFile(ValueError):
    """A data file whose pickle would import or call something other than plain data."""


class _DataOnly(pickle.Unpickler):
    def find_class(self, module: str, name: str):  # type: ignore[override]
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise UnsafeDataFile(f"it asks for {module}.{name}")


def _unpickle(path: Path) -> dict:
    with open(path, "rb") as f:
        try:
            found = _DataOnly(f, encoding="bytes").load()
        except UnsafeDataFile as exc:
            raise UnsafeDataFile(f"{path} is not a CIFAR batch file: {exc}, which a data file never does; "
                                 "nothing of it was run (use the official python release)") from None
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as exc:
            raise ValueError(f"{path} cannot be read as a CIFAR batch file ({type(exc).__name__}: {exc}); it may "
                             "be truncated: extract the official python release again") from None
    if not isinstance(found, dict):
        raise UnsafeDataFile(f"{path} is not a CIFAR batch file: it holds a {type(found).__name__}, not a dict")
    return found


def cifar_files(root: str | os.PathLike, split: str, num_classes: int = 10) -> list[Path]:
    """The release files that hold `split`, in order; ``root`` as in :func:`load_cifar`."""
    if num_classes not in (10, 100):
        raise ValueError(f"CIFAR has 10 or 100 classes, not {num_classes}")
    if split not in ("train", "test"):
        raise ValueError(f"CIFAR split must be 'train' or 'test', got {split!r}")
    root = Path(root).expanduser()
    sub = "cifar-10-batches-py" if num_classes == 10 else "cifar-100-python"
    marker = "data_batch_1" if num_classes == 10 else "train"
    folder = root if (root / marker).is_file() else root / sub
    if num_classes == 10:
        names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    else:
        names = [split]
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise FileNotFoundError(
            f"CIFAR-{num_classes} files {missing} not found in {folder} (give the folder of the python "
            f"release, '{sub}', or its parent)"
        )
    return [folder / n for n in names]


def load_cifar(root: str | os.PathLike, split: str, num_classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-10/100 from the python-pickle release. ``root`` is the extracted folder
    (``cifar-10-batches-py`` / ``cifar-100-python``) or its parent. Returns images uint8 ``(N, 32, 32, 3)``
    and labels int64 (fine labels for CIFAR-100), in the order of the release files."""
    label_key = b"labels" if num_classes == 10 else b"fine_labels"
    data, labels = [], []
    for path in cifar_files(root, split, num_classes):
        d = _unpickle(path)
        data.append(np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.append(np.asarray(d[label_key], dtype=np.int64))
    images = np.ascontiguousarray(np.concatenate(data).transpose(0, 2, 3, 1))
    return images, np.concatenate(labels)
