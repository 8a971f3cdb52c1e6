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
so a reader never sees a partial file, and an existing file is only replaced when asked to.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import json
import multiprocessing as mp
import os
import sys
import threading
import time
import traceback
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from invprop.data.cifar import load_cifar
from invprop.data.folder import IMAGE_EXTENSIONS, class_folders, decode, list_images

__all__ = [
    "ArraySource",
    "FolderSource",
    "IMAGE_EXTENSIONS",
    "beton_cache_name",
    "build_source",
    "ensure_beton",
    "load_cifar",
    "load_svhn",
    "read_beton_arrays",
    "write_beton",
]

# Bumped whenever the layout written by this module changes, so cached files are rewritten.
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

    def __getitem__(self, i: int):
        if not 0 <= i < self.n:
            raise IndexError(i)
        return self.source[i]


# ----------------------------------------------------------------------------------------------------
# Standard files
# ----------------------------------------------------------------------------------------------------


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


def _cfg_get(cfg: Any, key: str, default: Any = None) -> Any:
    if cfg is None:
        return default
    if isinstance(cfg, Mapping):
        val = cfg.get(key, default)
    else:
        val = getattr(cfg, key, default)
    return default if val is None else val


def build_source(data_cfg: Any, split: str):
    """The indexable source for a dataset config (``name``, ``root``, ...) and split."""
    name = str(_cfg_get(data_cfg, "name", "")).lower()
    root = _cfg_get(data_cfg, "root")
    # Same meaning as in invprop.data.datasets: ``subset`` keeps the first n *training* images (0 = all).
    limit = int(_cfg_get(data_cfg, "subset", 0) or 0) if split == "train" else 0
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
        try:
            from invprop.data import load_split
        except ImportError:  # the package may not re-export it
            from invprop.data.datasets import load_split

        images, labels = load_split(data_cfg, split)
        return ArraySource(np.asarray(images), np.asarray(labels), layout="chw")
    if limit > 0:
        src = _Limited(src, limit)
    return src


# ----------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------


class _GuardedSource:
    """Wraps a source for FFCV's writer processes: counts fetched samples and records the first failure in
    shared memory so the parent can stop instead of waiting forever (FFCV's writer polls a counter that a
    dead worker never advances)."""

    def __init__(self, source: Any) -> None:
        self.source = source
        self.fetched = mp.Value(ctypes.c_int64, 0)
        self.failed = mp.Value(ctypes.c_int64, -1)
        self.message = mp.Array(ctypes.c_char, 4096)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int):
        try:
            img, label, index = self.source[i]
            img = np.asarray(img)
            if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
                raise ValueError(f"sample {i}: image must be uint8 (H, W, 3), got {img.dtype} {img.shape}")
            out = (np.ascontiguousarray(img), int(label), int(index))
        except BaseException:
            text = traceback.format_exc()
            with self.failed.get_lock():
                if self.failed.value < 0:
                    self.failed.value = int(i)
                    self.message.value = text.encode("utf-8", "replace")[-4000:]
            sys.stderr.write(f"beton writer: sample {i} failed:\n{text}")
            raise
        with self.fetched.get_lock():
            self.fetched.value += 1
        return out


class _RichTqdm:
    """The part of tqdm's interface that ``ffcv.writer`` uses (``update``, ``close``), drawn with rich."""

    def __init__(self, progress: Any, task: Any) -> None:
        self.progress = progress
        self.task = task

    def update(self, n: int = 1) -> None:
        self.progress.update(self.task, advance=n)

    def close(self) -> None:
        self.progress.refresh()


_WRITER_PATCH_LOCK = threading.Lock()


@contextlib.contextmanager
def _patched_ffcv_writer(guard: _GuardedSource, total: int, description: str, show: bool) -> Iterator[None]:
    """Swap ``ffcv.writer``'s tqdm for a rich bar, and its poll ``sleep`` for one that watches the workers."""
    import ffcv.writer as fw
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    before = {p.pid for p in mp.active_children()}

    def watchdog_sleep(seconds: float) -> None:
        time.sleep(seconds)
        if guard.failed.value >= 0:
            msg = guard.message.value.decode("utf-8", "replace")
            raise RuntimeError(f"writing the beton failed on sample {guard.failed.value}:\n{msg}")
        alive = [p for p in mp.active_children() if p.pid not in before]
        if not alive and guard.fetched.value < total:
            raise RuntimeError(
                f"all beton writer processes exited after {guard.fetched.value} of {total} samples "
                "(killed? out of memory?)"
            )

    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.percentage:>5.1f}%"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        disable=not show,
        transient=False,
    )
    task = progress.add_task(description, total=total)
    with _WRITER_PATCH_LOCK:
        old_tqdm, old_sleep = fw.tqdm, fw.sleep
        fw.tqdm = lambda total=None, **kw: _RichTqdm(progress, task)
        fw.sleep = watchdog_sleep
        try:
            with progress:
                yield
        except BaseException:
            # End the writer processes this call started (and only those), so nothing keeps running.
            for p in mp.active_children():
                if p.pid not in before:
                    p.terminate()
            for p in mp.active_children():
                if p.pid not in before:
                    p.join(timeout=5)
            raise
        finally:
            fw.tqdm, fw.sleep = old_tqdm, old_sleep


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
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    guard = _GuardedSource(source)
    writer = DatasetWriter(str(tmp), fields, num_workers=num_workers, page_size=int(page_size))
    try:
        with _patched_ffcv_writer(guard, n, description or f"writing {out.name}", progress):
            writer.from_indexed_dataset(guard, chunksize=chunksize)
        os.replace(tmp, out)
    except BaseException:
        sm = getattr(writer, "metadata_sm", None)
        if sm is not None and not isinstance(sm, int):
            with contextlib.suppress(Exception):
                sm.close()
            with contextlib.suppress(Exception):
                sm.unlink()
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    return out


# ----------------------------------------------------------------------------------------------------
# Cache for the trainer
# ----------------------------------------------------------------------------------------------------

# Keys of a data config that do not change the content of the file.
_NON_CONTENT_KEYS = {"loader", "num_workers", "workers", "batch_size", "beton_dir", "ffcv", "cache_dir"}


def _plain(cfg: Any) -> dict:
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    except ImportError:  # pragma: no cover
        pass
    if isinstance(cfg, Mapping):
        return dict(cfg)
    return dict(vars(cfg))


def _beton_options(data_cfg: Any) -> dict:
    name = str(_cfg_get(data_cfg, "name", "")).lower()
    folder = name in FOLDER_NAMES
    return {
        "mode": str(_cfg_get(data_cfg, "beton_mode", "jpg" if folder else "raw")),
        "max_resolution": _cfg_get(data_cfg, "beton_max_resolution", 256 if folder else None),
        "jpeg_quality": int(_cfg_get(data_cfg, "beton_jpeg_quality", 90)),
    }


def beton_cache_name(data_cfg: Any, split: str) -> str:
    """File name of the cached beton: readable prefix plus a hash of every content-relevant config value."""
    plain = {k: v for k, v in _plain(data_cfg).items() if k not in _NON_CONTENT_KEYS}
    opts = _beton_options(data_cfg)
    key = json.dumps(
        {"cfg": plain, "split": split, "opts": opts, "v": BETON_FORMAT_VERSION}, sort_keys=True, default=str
    )
    digest = hashlib.sha1(key.encode()).hexdigest()[:10]
    parts = [str(_cfg_get(data_cfg, "name", "data"))]
    subset = _cfg_get(data_cfg, "subset")
    if subset not in (None, "", "none", 0, "0"):
        parts.append(str(subset))
    parts.append(split)
    size = _cfg_get(data_cfg, "image_size")
    if size:
        parts.append(f"{size}px")
    parts.append(opts["mode"])
    stem = "-".join(parts).replace(os.sep, "_").replace(" ", "_")
    return f"{stem}-{digest}.beton"


def ensure_beton(
    data_cfg: Any,
    split: str,
    out_dir: str | os.PathLike,
    *,
    num_workers: int | None = None,
    progress: bool = True,
) -> Path:
    """Path of the beton for ``data_cfg`` / ``split`` in ``out_dir``, writing it first if it is not there.

    The name encodes the dataset name, subset, split, size and write mode plus a hash of the whole config
    (minus loader-only keys), so a changed config never reuses a stale file. Concurrent callers (several
    ranks, several jobs on a shared file system) serialise on an ``flock`` beside the file and only the first
    writes.
    Optional config keys: ``beton_mode`` (raw; jpg for folders), ``beton_max_resolution`` (none; 256 for
    folders), ``beton_jpeg_quality`` (90). The source files are not checked again once the beton exists.
    """
    out_dir = Path(out_dir).expanduser().absolute()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / beton_cache_name(data_cfg, split)
    if path.is_file():
        return path
    lock_path = out_dir / f".{path.name}.lock"
    with open(lock_path, "a+") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            if path.is_file():
                return path
            source = build_source(data_cfg, split)
            opts = _beton_options(data_cfg)
            write_beton(
                source,
                path,
                mode=opts["mode"],
                max_resolution=opts["max_resolution"],
                jpeg_quality=opts["jpeg_quality"],
                num_workers=num_workers,
                overwrite=False,
                progress=progress,
                description=f"beton {path.name}",
            )
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
    return path


def read_beton_arrays(
    path: str | os.PathLike, fields: Sequence[str] = ("label", "index")
) -> dict[str, np.ndarray]:
    """The scalar fields of a beton, read from its metadata table (no decoding, no Loader)."""
    from ffcv.reader import Reader

    reader = Reader(str(path))
    out = {}
    for name in fields:
        f_ix = list(reader.handlers).index(name)
        out[name] = np.asarray(reader.metadata[f"f{f_ix}"]).astype(np.int64).reshape(-1)
    return out
