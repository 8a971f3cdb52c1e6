"""ImageNet-style image folders (``root/<split>/<class>/<image>``), read lazily.

:func:`scan_split` lists a split once (sorted class folders give labels 0..C-1, sorted paths give the
sample order, which is also the row order of the .beton and of the memory bank) and checks the layout with
one-line errors. :class:`FolderImages` is the lazy stand-in for the ``(N, 3, S, S)`` uint8 tensor that the
in-memory data sets return: ``images[i]`` decodes file ``i`` (shrunk to ``max_resolution`` exactly as the
.beton stores it, so both loaders draw the same crop boxes), ``images[a:b]`` / ``images[index_tensor]`` are
lazy views, and :func:`invprop.data.batches.eval_batches` streams evaluation views (a centred square,
resized) in batches, decoded by DataLoader workers. Nothing is held in memory but the file list.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from invprop.data.crop import stored_size

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class FolderDataError(ValueError):
    """A folder data set that cannot be read; the message is one line naming data.root and the fix."""


def class_folders(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def list_images(folder: Path, classes: Sequence[str]) -> tuple[list[str], list[int]]:
    """Image paths under ``folder/<class>`` (any depth, sorted) and their labels (the class's position).

    Symlinked folders inside a class folder are not entered (a link to '.' or '..' would repeat images or file
    every class under one; a class folder that is itself a link is read). A class folder without images is an
    error naming it: skipping it would shift every later label, keeping it would add a class no image has."""
    paths: list[str] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        before = len(paths)
        for dirpath, dirnames, filenames in os.walk(folder / name, followlinks=False):
            dirnames.sort()
            for fn in sorted(filenames):
                if fn.lower().endswith(IMAGE_EXTENSIONS):
                    paths.append(os.path.join(dirpath, fn))
                    labels.append(label)
        if len(paths) == before:
            raise FolderDataError(f"class folder {folder / name} has no images ({', '.join(IMAGE_EXTENSIONS)}); "
                                  "remove it or put its images in")
    return paths, labels


@functools.lru_cache(maxsize=8)
def scan_split(root: str, split: str) -> tuple[tuple[str, ...], tuple[str, ...], np.ndarray]:
    """``(classes, paths, labels)`` of ``root/<split>``. Classes are those of ``root/train`` for every split
    (so labels agree between splits); a class folder of another split that train lacks is an error.

    Cached per process: an ImageNet scan (1.28M files) takes seconds, and training and evaluation both ask.
    """
    base = Path(root).expanduser()
    if not base.is_dir():
        raise FolderDataError(f"data.root={root} does not exist; point it at the folder holding "
                                f"{split}/<class>/<image>")
    folder = base / split
    if not folder.is_dir():
        present = ", ".join(class_folders(base)[:5]) or "nothing"
        raise FolderDataError(f"data.root={root} has no '{split}' folder (found: {present}); the layout is "
                              f"root/{split}/<class>/<image>")
    classes = class_folders(folder)
    if split != "train":
        train_classes = scan_split(root, "train")[0]
        extra = sorted(set(classes) - set(train_classes))
        if extra:
            raise FolderDataError(f"{folder} has class folders that {base / 'train'} lacks ({', '.join(extra[:3])}); "
                                  "every split must use the training split's classes")
        classes = list(train_classes)
    if len(classes) < 2:
        raise FolderDataError(f"{folder} has {len(classes)} class folder(s); classification needs at least 2 "
                              f"(root/{split}/<class>/<image>)")
    paths, labels = list_images(folder, classes)
    if not paths:
        raise FolderDataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {folder}/<class>/")
    return tuple(classes), tuple(paths), np.asarray(labels, dtype=np.int64)


def spread_subset(n_total: int, n: int) -> np.ndarray:
    """``n`` indices spread evenly over ``0..n_total-1`` (the folder order is sorted by class, so the first
    ``n`` would be the first few classes only)."""
    if n <= 0 or n >= n_total:
        return np.arange(n_total, dtype=np.int64)
    return (np.arange(n, dtype=np.int64) * n_total) // n


def decode(path: str, max_resolution: int | None) -> np.ndarray:
    """The RGB ``(H, W, 3)`` uint8 pixels of one file, longer side shrunk to ``max_resolution`` with the
    .beton writer's size rounding (:func:`invprop.data.crop.stored_size`)."""
    from PIL import Image

    try:
        with warnings.catch_warnings():  # PIL only warns up to twice its pixel limit: refuse those as well
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                h, w = stored_size(im.height, im.width, max_resolution)
                if (h, w) != (im.height, im.width):
                    im.draft("RGB", (w, h))  # JPEG: decode at a reduced scale >= the target (much cheaper)
                    im = im.convert("RGB").resize((w, h), Image.Resampling.BOX)
                else:
                    im = im.convert("RGB")
                return np.array(im, dtype=np.uint8)  # own, writable copy
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # zero bytes, not an image, cut short, or a header claiming billions of pixels: name the file
        kind = f"{os.path.getsize(path)} bytes" if os.path.isfile(path) else "unreadable"
        raise FolderDataError(f"{path} ({kind}) cannot be read as an image ({type(exc).__name__}: "
                              f"{' '.join(str(exc).split())}); remove or replace it") from None


def center_square(img: torch.Tensor, ratio: float) -> torch.Tensor:
    """The centred square of side ``ratio * min(H, W)`` of a ``(C, H, W)`` image (as FFCV's eval decoder)."""
    h, w = int(img.shape[-2]), int(img.shape[-1])
    side = max(1, min(h, w, int(ratio * min(h, w))))
    top, left = (h - side) // 2, (w - side) // 2
    return img[:, top : top + side, left : left + side]


class FolderImages:
    """Lazy uint8 images of a folder split (see the module docstring). Picklable (DataLoader workers)."""

    def __init__(self, paths: Sequence[str], *, image_size: int, max_resolution: int | None = 256,
                 eval_crop_ratio: float = 0.875, eval_workers: int = 0) -> None:
        self.paths = np.asarray(paths, dtype=object)
        self.image_size = int(image_size)
        self.max_resolution = int(max_resolution) if max_resolution else None
        self.eval_crop_ratio = float(eval_crop_ratio)
        if not 0 < self.eval_crop_ratio <= 1:
            raise ValueError(f"data.eval_crop_ratio={eval_crop_ratio} must be in (0, 1]")
        self.eval_workers = int(eval_workers)

    def __len__(self) -> int:
        return len(self.paths)

    def view(self, paths: np.ndarray) -> FolderImages:
        return FolderImages(paths, image_size=self.image_size, max_resolution=self.max_resolution,
                            eval_crop_ratio=self.eval_crop_ratio, eval_workers=self.eval_workers)

    def __getitem__(self, key: int | slice | torch.Tensor | Sequence[int]) -> torch.Tensor | FolderImages:
        if isinstance(key, slice):
            return self.view(self.paths[key])
        if isinstance(key, torch.Tensor) and key.ndim == 0:
            key = int(key)
        if isinstance(key, int | np.integer):
            return torch.from_numpy(decode(str(self.paths[int(key)]), self.max_resolution)).permute(2, 0, 1)
        idx = key.cpu().numpy() if isinstance(key, torch.Tensor) else np.asarray(key)
        return self.view(self.paths[idx])

    def eval_image(self, i: int, size: int | None = None) -> torch.Tensor:
        """Image ``i`` as evaluation sees it: the centred square (``eval_crop_ratio`` of the shorter side) of
        the stored image, resized to ``size`` (default ``image_size``): Resize(S / ratio) + CenterCrop(S)."""
        from invprop.data.geometric import resize_uint8

        return resize_uint8(center_square(self[i], self.eval_crop_ratio), size or self.image_size)
