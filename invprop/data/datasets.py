"""Dataset registry: every dataset becomes uint8 images ``(N, 3, S, S)`` and int64 labels.

In-memory data sets (Fashion-MNIST, synthetic, CIFAR-10/100) return a tensor; image folders (``folder``,
``imagenet``: ``root/<split>/<class>/<image>``) return a lazy :class:`~invprop.data.folder.FolderImages`
that indexes like one (``images[i]``, slices, index tensors) and decodes files only when asked.

``data_cfg`` is the ``data`` node of the Hydra config (any mapping with ``.get``): ``name`` (one of
:data:`DATASETS`), ``root`` (null or a folder), ``subset`` (keep n training images, 0 = all: the first n,
or n spread evenly over a folder's class-sorted files), ``image_size`` (32), ``resize_mode`` ("pad" |
"resize", Fashion-MNIST), ``eval_split`` (default "val" for folders, else "test"), ``mean`` / ``std``
(override the normalisation); synthetic also reads ``n_train``, ``n_test``, ``num_classes``, ``seed`` and
``noise`` (0.35); folders read ``beton_max_resolution`` (256), ``eval_crop_ratio`` (0.875) and
``eval_workers`` (0). Unknown keys are ignored.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from invprop.data import fashion_mnist
from invprop.data.cifar import CIFAR_STATS, load_cifar
from invprop.data.folder import FolderImages, scan_split, spread_subset
from invprop.data.synthetic import make_synthetic

if TYPE_CHECKING:
    from invprop.config.data_schema import DataConfig

DATASETS = ("fashion_mnist", "synthetic", "cifar10", "cifar100", "folder", "imagenet")
FOLDERS = ("folder", "imagenet")
CIFARS = {"cifar10": 10, "cifar100": 100}
SPLITS = ("train", "test", "val")
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))

# Per-channel statistics of the *training* split as the model sees it (after pad/resize), so zero padding's
# extra black pixels are accounted for. Measured with `normalization_from_data` on the full split.
_STATS: dict[tuple[str, str], tuple[tuple[float, ...], tuple[float, ...]]] = {
    ("fashion_mnist", "pad"): ((0.2190,) * 3, (0.3318,) * 3),
    ("fashion_mnist", "resize"): ((0.2854,) * 3, (0.3384,) * 3),
    ("synthetic", "any"): ((0.509,) * 3, (0.182,) * 3),  # seed-dependent; approximate
    ("cifar10", "any"): CIFAR_STATS[10],
    ("cifar100", "any"): CIFAR_STATS[100],
    ("imagenet", "any"): IMAGENET_STATS,
    ("folder", "any"): IMAGENET_STATS,  # photos: ImageNet's statistics unless data.mean / data.std say otherwise
}


def _name(data_cfg: DataConfig) -> str:
    name = str(data_cfg.name)
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {DATASETS}")
    return name


def _check_split(split: str, name: str = "") -> None:
    # An image folder's splits are its sub-folders (checked when scanned); the others have train and test.
    if name not in FOLDERS and split not in SPLITS[:2]:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS[:2]}")


def eval_split(data_cfg: DataConfig) -> str:
    """The split evaluation reads (``data.eval_split``)."""
    return str(data_cfg.eval_split)


def _root(data_cfg: DataConfig, name: str) -> str:
    root = data_cfg.root
    if root is None:
        raise ValueError(f"data.root is null; data={name} needs data.root=<folder of the data set>")
    return str(root)


@functools.lru_cache(maxsize=4)
def _cifar_raw(root: str, classes: int, split: str) -> tuple[np.ndarray, np.ndarray]:
    # Cached: training and kNN evaluation both read the train split.
    images, labels = load_cifar(root, split, classes)
    images = np.ascontiguousarray(images.transpose(0, 3, 1, 2))
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def _folder_rows(data_cfg: DataConfig, split: str) -> tuple[tuple[str, ...], np.ndarray, np.ndarray]:
    """``(paths, labels, rows)`` of a folder split: ``rows`` are the kept positions in the scan."""
    name = _name(data_cfg)
    _, paths, labels = scan_split(_root(data_cfg, name), split)
    rows = spread_subset(len(paths), _subset(data_cfg, split, len(paths)))
    return paths, labels, rows


def folder_images(data_cfg: DataConfig, split: str) -> tuple[FolderImages, torch.Tensor]:
    """The lazy images and labels of a folder split (after ``data.subset``)."""
    paths, labels, rows = _folder_rows(data_cfg, split)
    images = FolderImages(np.asarray(paths, dtype=object)[rows], image_size=int(data_cfg.image_size),
                          max_resolution=data_cfg.beton_max_resolution,
                          eval_crop_ratio=float(data_cfg.eval_crop_ratio),
                          eval_workers=int(data_cfg.eval_workers))
    return images, torch.from_numpy(labels[rows].copy())


def _subset(data_cfg: DataConfig, split: str, n: int) -> int:
    # The subset option restricts the *training* set only, so evaluation numbers stay comparable.
    k = int(data_cfg.subset)
    if k < 0:
        raise ValueError(f"data.subset must be >= 0, got {k}")
    return min(n, k) if (split == "train" and k > 0) else n


def _synthetic_size(data_cfg: DataConfig, split: str) -> int:
    return int(data_cfg.n_train if split == "train" else data_cfg.n_test)


def dataset_size(data_cfg: DataConfig, split: str = "train") -> int:
    """Number of samples of ``split`` after ``data.subset``, without reading any pixels."""
    name = _name(data_cfg)
    _check_split(split, name)
    if name in FOLDERS:
        return len(_folder_rows(data_cfg, split)[2])
    if name in CIFARS:
        n = len(_cifar_raw(_root(data_cfg, name), CIFARS[name], split)[1])
    elif name == "fashion_mnist":
        n = fashion_mnist.SPLIT_SIZES[split]
    else:
        n = _synthetic_size(data_cfg, split)
    return _subset(data_cfg, split, n)


def num_classes(data_cfg: DataConfig) -> int:
    name = _name(data_cfg)
    if name in CIFARS:
        return CIFARS[name]
    if name in FOLDERS:
        return len(scan_split(_root(data_cfg, name), "train")[0])
    return fashion_mnist.NUM_CLASSES if name == "fashion_mnist" else int(data_cfg.num_classes)


def normalization(data_cfg: DataConfig) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(mean, std)`` per RGB channel, in [0, 1] pixel units, for the configured dataset and resize mode
    (``data.mean`` / ``data.std`` override it)."""
    name = _name(data_cfg)
    mean, std = data_cfg.mean, data_cfg.std
    if mean is not None and std is not None:
        return tuple(float(v) for v in mean), tuple(float(v) for v in std)
    if name != "fashion_mnist":
        return _STATS[(name, "any")]
    mode = str(data_cfg.resize_mode)
    return _STATS[(name, "pad" if mode == "pad" else "resize")]


def normalization_from_data(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean/std of uint8 ``(N, 3, H, W)`` images (used to derive the table above)."""
    x = images.to(torch.float64) / 255.0
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3))
    return tuple(round(float(v), 4) for v in mean), tuple(round(float(v), 4) for v in std)


@functools.lru_cache(maxsize=4)
def _fashion_raw(split: str, root: str | None) -> tuple[np.ndarray, np.ndarray]:
    # Cached: training and kNN evaluation both read the train split; decompressing twice is wasted time.
    images, labels = fashion_mnist.load_fashion_mnist(split, root)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def to_rgb_size(gray: torch.Tensor, image_size: int, resize_mode: str, chunk: int = 8192) -> torch.Tensor:
    """uint8 ``(N, H, W)`` grey -> uint8 ``(N, 3, S, S)``: centred zero padding, or bilinear resize."""
    n, h, w = gray.shape
    out = torch.empty(n, 3, image_size, image_size, dtype=torch.uint8)
    if resize_mode == "pad":
        if image_size < h or image_size < w:
            raise ValueError(f"resize_mode=pad needs image_size >= {max(h, w)}, got {image_size}")
        top, left = (image_size - h) // 2, (image_size - w) // 2
        out.zero_()
        out[:, :, top : top + h, left : left + w] = gray.unsqueeze(1)
        return out
    if resize_mode != "resize":
        raise ValueError(f"unknown resize_mode {resize_mode!r}; expected 'pad' or 'resize'")
    for c0 in range(0, n, chunk):  # chunked: the float copy of 60k images would be 4x the uint8 size
        x = gray[c0 : c0 + chunk].unsqueeze(1).float()
        if (h, w) != (image_size, image_size):
            x = F.interpolate(
                x,
                size=(image_size, image_size),
                mode="bilinear",
                align_corners=False,
                antialias=image_size < max(h, w),
            )
        out[c0 : c0 + chunk] = x.round().clamp_(0, 255).to(torch.uint8).expand(-1, 3, -1, -1)
    return out


def resize_square(images: torch.Tensor, image_size: int, chunk: int = 4096) -> torch.Tensor:
    """uint8 ``(N, C, H, W)`` -> ``(N, C, S, S)`` (bilinear, antialiased when shrinking); unchanged if equal."""
    n, c, h, w = images.shape
    if (h, w) == (image_size, image_size):
        return images
    out = torch.empty(n, c, image_size, image_size, dtype=torch.uint8)
    for c0 in range(0, n, chunk):
        x = F.interpolate(images[c0 : c0 + chunk].float(), size=(image_size, image_size), mode="bilinear",
                          align_corners=False, antialias=image_size < max(h, w))
        out[c0 : c0 + chunk] = x.round().clamp_(0, 255).to(torch.uint8)
    return out


def load_split(data_cfg: DataConfig, split: str) -> tuple[Any, torch.Tensor]:
    """Return ``(images, labels int64 (N,))`` of ``split``: images are uint8 ``(N, 3, S, S)`` in memory, or a
    lazy :class:`~invprop.data.folder.FolderImages` for image folders."""
    name = _name(data_cfg)
    _check_split(split, name)
    if name in FOLDERS:
        return folder_images(data_cfg, split)
    image_size = int(data_cfg.image_size)
    n = dataset_size(data_cfg, split)
    if name in CIFARS:
        raw_images, raw_labels = _cifar_raw(_root(data_cfg, name), CIFARS[name], split)
        images = resize_square(torch.from_numpy(raw_images[:n].copy()), image_size)
        return images, torch.from_numpy(raw_labels[:n].copy())
    if name == "fashion_mnist":
        root = data_cfg.root
        raw_images, raw_labels = _fashion_raw(split, None if root is None else str(root))
        gray = torch.from_numpy(raw_images[:n].copy())
        images = to_rgb_size(gray, image_size, str(data_cfg.resize_mode))
        labels = torch.from_numpy(raw_labels[:n].copy())
        return images, labels
    images, labels = make_synthetic(
        n,
        image_size=image_size,
        num_classes=num_classes(data_cfg),
        seed=int(data_cfg.seed),
        split=split,
        noise=float(data_cfg.noise),
    )
    return images, labels
