"""Dataset registry: every dataset becomes uint8 ``(N, 3, S, S)`` images and int64 labels.

``data_cfg`` is the ``data`` node of the Hydra config (any mapping with ``.get``): ``name``
("fashion_mnist" | "synthetic"), ``root`` (null or a folder), ``subset`` (keep the first n training images,
0 = all), ``image_size`` (32), ``resize_mode`` ("pad" | "resize"); synthetic also reads ``n_train``,
``n_test``, ``num_classes``, ``seed`` and ``noise`` (0.35). Unknown keys are ignored.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from invprop.data import fashion_mnist
from invprop.data.synthetic import make_synthetic

DATASETS = ("fashion_mnist", "synthetic")
SPLITS = ("train", "test")

# Per-channel statistics of the *training* split as the model sees it (after pad/resize), so zero padding's
# extra black pixels are accounted for. Measured with `normalization_from_data` on the full split.
_STATS: dict[tuple[str, str], tuple[tuple[float, ...], tuple[float, ...]]] = {
    ("fashion_mnist", "pad"): ((0.2190,) * 3, (0.3318,) * 3),
    ("fashion_mnist", "resize"): ((0.2854,) * 3, (0.3384,) * 3),
    ("synthetic", "any"): ((0.509,) * 3, (0.182,) * 3),  # seed-dependent; approximate
}


def _get(cfg: Mapping[str, Any] | Any, key: str, default: Any) -> Any:
    value = cfg.get(key, default) if cfg is not None else default
    return default if value is None else value


def _name(data_cfg: Any) -> str:
    name = str(_get(data_cfg, "name", "fashion_mnist"))
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {DATASETS}")
    return name


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")


def _subset(data_cfg: Any, split: str, n: int) -> int:
    # The subset option restricts the *training* set only, so evaluation numbers stay comparable.
    k = int(_get(data_cfg, "subset", 0))
    if k < 0:
        raise ValueError(f"data.subset must be >= 0, got {k}")
    return min(n, k) if (split == "train" and k > 0) else n


def _synthetic_size(data_cfg: Any, split: str) -> int:
    return int(_get(data_cfg, "n_train" if split == "train" else "n_test", 2000 if split == "train" else 500))


def dataset_size(data_cfg: Any, split: str = "train") -> int:
    """Number of samples of ``split`` after ``data.subset``, without reading any pixels."""
    _check_split(split)
    name = _name(data_cfg)
    n = fashion_mnist.SPLIT_SIZES[split] if name == "fashion_mnist" else _synthetic_size(data_cfg, split)
    return _subset(data_cfg, split, n)


def num_classes(data_cfg: Any) -> int:
    name = _name(data_cfg)
    return fashion_mnist.NUM_CLASSES if name == "fashion_mnist" else int(_get(data_cfg, "num_classes", 10))


def normalization(data_cfg: Any) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(mean, std)`` per RGB channel, in [0, 1] pixel units, for the configured dataset and resize mode."""
    name = _name(data_cfg)
    if name == "synthetic":
        return _STATS[("synthetic", "any")]
    mode = str(_get(data_cfg, "resize_mode", "pad"))
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


def load_split(data_cfg: Any, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(images uint8 (N, 3, S, S), labels int64 (N,))`` of ``split`` ("train" | "test")."""
    _check_split(split)
    name = _name(data_cfg)
    image_size = int(_get(data_cfg, "image_size", 32))
    n = dataset_size(data_cfg, split)
    if name == "fashion_mnist":
        root = _get(data_cfg, "root", None)
        raw_images, raw_labels = _fashion_raw(split, None if root is None else str(root))
        gray = torch.from_numpy(raw_images[:n].copy())
        images = to_rgb_size(gray, image_size, str(_get(data_cfg, "resize_mode", "pad")))
        labels = torch.from_numpy(raw_labels[:n].copy())
        return images, labels
    images, labels = make_synthetic(
        n,
        image_size=image_size,
        num_classes=num_classes(data_cfg),
        seed=int(_get(data_cfg, "seed", 0)),
        split=split,
        noise=float(_get(data_cfg, "noise", 0.35)),
    )
    return images, labels
