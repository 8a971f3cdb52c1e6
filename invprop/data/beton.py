"""Writing datasets to FFCV ``.beton`` files.

Every file has three fields, in this order:

- ``image``: :class:`ffcv.fields.RGBImageField` (``raw`` uint8 pixels or ``jpg``; optional
  ``max_resolution`` resize of the longer side, done by FFCV with ``cv2.INTER_AREA``),
- ``label``: :class:`ffcv.fields.IntField`,
- ``index``: :class:`ffcv.fields.IntField`, the row of the sample in the file, which is also its row in the
  memory bank (rows are written in the order of the source: row ``i`` is sample ``i``).

Sources: Fashion-MNIST and the synthetic generator (through ``load_split``), CIFAR-10/100 (the
python-pickle folders ``cifar-10-batches-py`` / ``cifar-100-python``), SVHN (``{train,test,extra}_32x32.mat``,
read with scipy) and ImageNet-style image folders (``root/<split>/<class>/<image>`` or
``root/<class>/<image>``).

Files are written to a temporary name in the destination folder and moved into place with ``os.replace``,
so a reader never sees a partial file, and an existing file is only replaced when asked to. The trainer's
cache of such files is :mod:`invprop.data.beton_cache`; the datasets themselves are read by their own modules
(``cifar``, ``svhn``, ``folder``, ``datasets``). FFCV is imported only when a file is written or read.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from invprop.atomic import atomic_path
from invprop.data.cifar import load_cifar
from invprop.data.folder import IMAGE_EXTENSIONS, FolderDataError, class_folders, decode, list_images
from invprop.data.svhn import load_svhn

__all__ = [
    "ArraySource",
    "FolderSource",
    "build_source",
    "cfg_get",
    "read_beton_arrays",
    "write_beton",
]

# Bumped whenever the layout written by this module changes, so cached files (beton_cache) are rewritten.
BETON_FORMAT_VERSION = 1

# Names handled here; any other name goes through ``invprop.data.load_split``.
CIFAR_NAMES = {"cifar10": 10, "cifar-10": 10, "cifar100": 100, "cifar-100": 100}
SVHN_NAMES = {"svhn"}
FOLDER_NAMES = {"folder", "imagefolder", "image_folder", "imagenet"}


# ----------------------------------------------------------------------------------------------------
# Sources: indexable objects giving (image HWC uint8, label, index)
# ----------------------------------------------------------------------------------------------------


class ArraySource:
    """An in-memory dataset: ``images`` uint8 ``(N, 3, H, W)`` (``layout="chw"``) or ``(N, H, W, 3)``
    (``layout="hwc"``), ``labels`` integers ``(N,)``. Item ``i`` is ``(image HWC uint8, label, i)``."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, layout: str = "chw") -> None:
        images = np.asarray(images)
        labels = np.asarray(labels).reshape(-1)
        if images.dtype != np.uint8:
            raise ValueError(f"images must be uint8, got {images.dtype}")
        if layout not in ("chw", "hwc"):
            raise ValueError(f"layout must be 'chw' or 'hwc', got {layout!r}")
        if images.ndim != 4 or images.shape[1 if layout == "chw" else 3] != 3:
            raise ValueError(f"images must be (N,3,H,W) or (N,H,W,3) for layout={layout}, got {images.shape}")
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = labels.astype(np.int64)
        self.layout = layout

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int, int]:
        img = self.images[i]
        if self.layout == "chw":
            img = img.transpose(1, 2, 0)
        return np.ascontiguousarray(img), int(self.labels[i]), int(i)


class FolderSource:
    """An ImageNet-style folder: one sub-folder per class (sorted names give labels 0..C-1), images in them
    (any depth, sorted paths). ``root/<split>`` is used when it exists, else ``root`` itself. ``rows``
    (optional) keeps those positions of the scan, in that order (``data.subset`` of the trainer)."""

    def __init__(self, root: str | os.PathLike, split: str | None = None, rows: Sequence[int] | None = None
                 ) -> None:
        root = Path(root).expanduser()
        if split is not None and (root / split).is_dir():
            root = root / split
        if not root.is_dir():
            raise FileNotFoundError(f"image folder {root} does not exist")
        classes = class_folders(root)
        if not classes:
            raise FileNotFoundError(f"no class sub-folders in {root} (expected root/<class>/<image>)")
        self.root = root
        self.classes = classes
        paths, labels = list_images(root, classes)
        if not paths:
            raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {root}")
        keep = np.arange(len(paths)) if rows is None else np.asarray(rows, dtype=np.int64)
        self.samples = [(paths[i], labels[i]) for i in keep.tolist()]
        self.labels = np.array([lbl for _, lbl in self.samples], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int, int]:
        path, label = self.samples[i]
        return np.ascontiguousarray(decode(path, None)), int(label), int(i)


class _Limited:
    """The first ``n`` items of a source."""

    def __init__(self, source: Any, n: int) -> None:
        self.source = source
        self.n = min(int(n), len(source))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[np.ndarray, int, int]:
        if not 0 <= i < self.n:
            raise IndexError(i)
        return self.source[i]


# ----------------------------------------------------------------------------------------------------
# From a data config
# ----------------------------------------------------------------------------------------------------


def cfg_get(cfg: Any, key: str, default: Any = None) -> Any:
    """``cfg[key]`` of a mapping or an attribute object; ``default`` when absent or None."""
    if cfg is None:
        return default
    if isinstance(cfg, Mapping):
        val = cfg.get(key, default)
    else:
        val = getattr(cfg, key, default)
    return default if val is None else val


def build_source(data_cfg: Any, split: str) -> ArraySource | FolderSource | _Limited:
    """The indexable source for a dataset config (``name``, ``root``, ...) and split."""
    name = str(cfg_get(data_cfg, "name", "")).lower()
    root = cfg_get(data_cfg, "root")
    # Same meaning as in invprop.data.datasets: ``subset`` keeps the first n *training* images (0 = all).
    limit = int(cfg_get(data_cfg, "subset", 0) or 0) if split == "train" else 0
    if name in CIFAR_NAMES:
        if root is None:
            raise ValueError(f"data.root must point at the CIFAR folder for {name}")
        src: Any = ArraySource(*load_cifar(root, split, CIFAR_NAMES[name]), layout="hwc")
    elif name in SVHN_NAMES:
        if root is None:
            raise ValueError("data.root must point at the folder with the SVHN .mat files")
        src = ArraySource(*load_svhn(root, split), layout="hwc")
    elif name in ("folder", "imagenet"):
        # The trainer's folder data sets: root/<split>/<class>/<image>, checked, the same rows as load_split.
        from invprop.data.datasets import _folder_rows

        _, _, rows = _folder_rows(data_cfg, split)
        return FolderSource(Path(str(root)) / split, None, rows)
    elif name in FOLDER_NAMES:
        if root is None:
            raise ValueError(f"data.root must point at the image folder for {name}")
        src = FolderSource(root, split)
    else:
        from invprop.data.datasets import load_split

        images, labels = load_split(data_cfg, split)
        return ArraySource(np.asarray(images), np.asarray(labels), layout="chw")
    if limit > 0:
        src = _Limited(src, limit)
    return src


# ----------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------


def write_beton(
    source: Any,
    out_path: str | os.PathLike,
    *,
    mode: str = "raw",
    max_resolution: int | None = None,
    jpeg_quality: int = 90,
    num_workers: int | None = None,
    overwrite: bool = False,
    chunksize: int = 100,
    progress: bool = True,
    description: str | None = None,
    page_size: int | None = None,
) -> Path:
    """Write ``source`` (indexable, items ``(image HWC uint8, label, index)``) to ``out_path``.

    ``mode``: ``raw`` (exact pixels) or ``jpg`` (``jpeg_quality``); ``max_resolution``: if given, images
    whose longer side exceeds it are shrunk to it (aspect kept). Raises ``FileExistsError`` if ``out_path``
    exists and ``overwrite`` is false. The data goes to a temporary file beside ``out_path``, moved into place
    at the end. ``page_size`` (a power of two >= 2 MiB) defaults to 2 MiB for in-memory arrays of small
    images (each writer process fills whole pages, so small files stay small) and FFCV's 8 MiB otherwise;
    one encoded image must fit in a page.
    """
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    from invprop.data.ffcv.compat import GuardedSource, patched_writer, release_writer_memory

    if mode not in ("raw", "jpg"):
        raise ValueError(f"mode must be 'raw' or 'jpg', got {mode!r}")
    if not 1 <= int(jpeg_quality) <= 100:
        raise ValueError(f"jpeg_quality must be in 1..100, got {jpeg_quality}")
    out = Path(out_path).expanduser().absolute()
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists (pass overwrite=True / --overwrite to replace it)")
    n = len(source)
    if n == 0:
        raise ValueError("the source is empty")
    out.parent.mkdir(parents=True, exist_ok=True)
    if num_workers is None or num_workers < 1:
        num_workers = max(1, min(8, len(os.sched_getaffinity(0))))
    num_workers = max(1, min(int(num_workers), -(-n // max(1, chunksize))))

    fields = {
        "image": RGBImageField(
            write_mode=mode,
            max_resolution=None if not max_resolution else int(max_resolution),
            jpeg_quality=int(jpeg_quality),
        ),
        "label": IntField(),
        "index": IntField(),
    }
    if page_size is None:
        page_size = 8 * 2**20
        base = source.source if isinstance(source, _Limited) else source
        if isinstance(base, ArraySource) and base.images[0].size <= 2**19:
            page_size = 2 * 2**20
    guard = GuardedSource(source, user_errors=(FolderDataError,))
    with atomic_path(out) as tmp:
        writer = DatasetWriter(str(tmp), fields, num_workers=num_workers, page_size=int(page_size))
        try:
            with patched_writer(guard, n, description or f"writing {out.name}", progress):
                writer.from_indexed_dataset(guard, chunksize=chunksize)
        except BaseException:
            release_writer_memory(writer)
            raise
    return out


def read_beton_arrays(
    path: str | os.PathLike, fields: Sequence[str] = ("label", "index")
) -> dict[str, np.ndarray]:
    """The scalar fields of a beton, read from its metadata table (no decoding, no Loader)."""
    from invprop.data.ffcv.compat import read_metadata

    _, tables = read_metadata(str(path))
    missing = [f for f in fields if f not in tables]
    if missing:
        raise ValueError(f"{path} lacks fields {missing} (has {list(tables)})")
    return {name: np.asarray(tables[name]).astype(np.int64).reshape(-1) for name in fields}
