"""Real data files written by tests: CIFAR pickles in the official layout and an ImageFolder tree of JPEGs."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np


def _pictures(n: int, classes: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (n, size, size, 3) images whose class decides a coloured shape (learnable, not trivial)."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    rng.shuffle(labels)
    yy, xx = np.mgrid[0:size, 0:size] / size
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    for i, c in enumerate(labels):
        base = rng.integers(0, 80, 3)
        colour = np.array([(c * 97) % 256, (c * 53 + 80) % 256, (c * 29 + 160) % 256])
        cx, cy, r = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), 0.15 + 0.05 * (c % 3)
        mask = ((xx - cx) ** 2 + (yy - cy) ** 2 < r * r) if c % 2 == 0 else (
            (np.abs(xx - cx) < r) & (np.abs(yy - cy) < r))
        img = base + rng.normal(0, 12, (size, size, 3))
        img[mask] = colour + rng.normal(0, 12, (int(mask.sum()), 3))
        images[i] = np.clip(img, 0, 255).astype(np.uint8)
    return images, labels.astype(np.int64)


def write_cifar(root: Path, classes: int = 10, n_train: int = 200, n_test: int = 100, seed: int = 0) -> Path:
    """The python release layout (cifar-10-batches-py: data_batch_1..5 + test_batch; cifar-100-python:
    train + test) under ``root``; returns the release folder."""
    sub = root / ("cifar-10-batches-py" if classes == 10 else "cifar-100-python")
    sub.mkdir(parents=True, exist_ok=True)
    images, labels = _pictures(n_train + n_test, classes, 32, seed)
    flat = images.transpose(0, 3, 1, 2).reshape(len(images), -1)  # rows of 3072: R plane, G plane, B plane
    key = b"labels" if classes == 10 else b"fine_labels"
    parts = np.array_split(np.arange(n_train), 5) if classes == 10 else [np.arange(n_train)]
    names = [f"data_batch_{i + 1}" for i in range(5)] if classes == 10 else ["train"]
    for name, rows in zip(names + ["test_batch" if classes == 10 else "test"],
                          parts + [np.arange(n_train, n_train + n_test)], strict=True):
        with open(sub / name, "wb") as f:
            pickle.dump({b"data": flat[rows], key: labels[rows].tolist()}, f)
    return sub


def write_image_folder(root: Path, classes: int = 3, per_class: tuple[int, int] = (20, 8), seed: int = 0,
                       sizes: tuple[int, int] = (40, 400)) -> Path:
    """root/{train,val}/<class>/<i>.jpg: JPEGs of varied sizes and aspect ratios (pictures enlarged with
    Pillow to ``sizes[0]``-``sizes[1]`` px a side)."""
    from PIL import Image

    rng = np.random.default_rng(seed + 1)
    for split, n in zip(("train", "val"), per_class, strict=True):
        images, labels = _pictures(n * classes, classes, 32, seed + (split == "val"))
        for i, (img, c) in enumerate(zip(images, labels, strict=True)):
            folder = root / split / f"class_{c:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            w, h = (int(v) for v in rng.integers(sizes[0], sizes[1] + 1, 2))
            Image.fromarray(img).resize((w, h), Image.Resampling.BILINEAR).save(folder / f"img_{i:04d}.jpg",
                                                                                 quality=92)
    return root
