"""Evaluation batches of a split's images, whether they sit in memory or in files.

Images are either a uint8 ``(N, 3, S, S)`` tensor (Fashion-MNIST, CIFAR, synthetic) or a lazy
:class:`~invprop.data.folder.FolderImages` (image folders, where a 224 px ImageNet split would not fit in
memory). Code that needs pixels in batches (features for kNN, probes, fine-tuning) goes through
:func:`eval_batches`, which slices the tensor or streams decoded files through DataLoader workers.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset


def is_lazy(images: Any) -> bool:
    """True for file-backed images (no pixels in memory)."""
    return not isinstance(images, torch.Tensor)


class _EvalViews(Dataset):
    def __init__(self, images: Any) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images.eval_image(i)


def eval_batches(images: Any, batch_size: int, num_workers: int | None = None) -> Iterator[torch.Tensor]:
    """uint8 ``(B, 3, S, S)`` batches of ``images`` in order, the last one possibly smaller.

    Lazy images are decoded by ``num_workers`` DataLoader workers (default: their ``eval_workers``).
    """
    if not is_lazy(images):
        for lo in range(0, images.shape[0], batch_size):
            yield images[lo : lo + batch_size]
        return
    if hasattr(images, "batches"):  # rows of a .beton (invprop.eval.readers.BetonRows): FFCV decodes them
        yield from images.batches(batch_size)
        return
    workers = int(images.eval_workers if num_workers is None else num_workers)
    yield from DataLoader(_EvalViews(images), batch_size=batch_size, shuffle=False, num_workers=workers,
                          persistent_workers=False)


def materialize(images: Any, batch_size: int = 256) -> torch.Tensor:
    """All of ``images`` as one uint8 tensor (evaluation views for lazy images): for small subsets only."""
    if not is_lazy(images):
        return images
    parts = list(eval_batches(images, batch_size))
    return torch.cat(parts) if parts else torch.empty(0, 3, images.image_size, images.image_size, dtype=torch.uint8)
