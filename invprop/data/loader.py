"""The plain PyTorch ``DataLoader`` path (no FFCV), with the same order and augmentation semantics.

Training batches come from :class:`~invprop.data.order.EpochOrder` (resumable at any global batch, same
samples per step for any world size); each sample's crop box and flip come from
:func:`invprop.data.crop.sample_crop` of (seed, epoch, index, image size), the function the FFCV decoder
compiles too, so both paths crop a sample the same way.
Colour augmentation and normalisation are left to :class:`~invprop.data.augment.BatchColorAugment` on the
device, so batches leave the loader as uint8.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from invprop.data.crop import CROP_RATIO, sample_crop
from invprop.data.geometric import resize_uint8
from invprop.data.order import EpochOrder
from invprop.data.seeding import derive_seed

if TYPE_CHECKING:
    from invprop.config.data_schema import AugmentConfig, DataConfig


class IndexedImageDataset(Dataset):
    """``(uint8 (3, S, S) image, int label, int index)`` over uint8 images: an in-memory ``(N, 3, H, W)``
    tensor, or a lazy :class:`~invprop.data.folder.FolderImages` (files decoded on access, in the workers).

    In train mode each item is RandomResizedCrop'ed (and optionally flipped) with the box of
    :func:`~invprop.data.crop.sample_crop` for ``(seed, epoch, index)``; call :meth:`set_epoch` before
    building each epoch's loader. In eval mode images are returned as stored (in-memory, resized only if
    ``out_size`` differs) or as their evaluation view (lazy: centred square, resized).
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        *,
        train: bool,
        seed: int = 0,
        out_size: int | None = None,
        crop_scale: tuple[float, float] = (0.2, 1.0),
        crop_ratio: tuple[float, float] = CROP_RATIO,
        flip: bool = False,
    ) -> None:
        lazy = not isinstance(images, torch.Tensor)
        if not lazy and (images.dtype != torch.uint8 or images.ndim != 4):
            raise ValueError(f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = labels.to(torch.int64)
        self.train = bool(train)
        self.seed = int(seed)
        self.lazy = lazy
        self.out_size = int(out_size) if out_size is not None else int(images.image_size if lazy else images.shape[-1])
        self.crop_scale = (float(crop_scale[0]), float(crop_scale[1]))
        self.crop_ratio = (float(crop_ratio[0]), float(crop_ratio[1]))
        self.flip = bool(flip)
        self.epoch = 0
        if self.train:
            sample_crop(self.seed, 0, 0, 2, 2)  # compile the crop box now, before DataLoader workers fork

    @classmethod
    def from_config(
        cls,
        images: torch.Tensor,
        labels: torch.Tensor,
        aug_cfg: AugmentConfig,
        *,
        train: bool,
        seed: int,
        out_size: int | None = None,
    ) -> IndexedImageDataset:
        """Crop scale and flip from the ``data.augment`` section (the aspect-ratio range is crop.py's, for both
        loaders)."""
        return cls(images, labels, train=train, seed=seed, out_size=out_size,
                   crop_scale=tuple(aug_cfg.crop_scale), flip=bool(aug_cfg.flip))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        index = int(index)
        if not self.train and self.lazy:
            return self.images.eval_image(index, self.out_size), int(self.labels[index]), index
        img = self.images[index]  # lazy: the decoded file, shrunk to the beton's max_resolution
        if self.train:
            top, left, h, w, flip = sample_crop(self.seed, self.epoch, index, int(img.shape[-2]), int(img.shape[-1]),
                                                self.crop_scale, self.crop_ratio)
            img = resize_uint8(img[:, top : top + h, left : left + w], self.out_size)
            if self.flip and flip:
                img = img.flip(-1)
        elif img.shape[-1] != self.out_size or img.shape[-2] != self.out_size:
            img = resize_uint8(img, self.out_size)
        return img, int(self.labels[index]), index


class EpochBatchSampler(Sampler[list[int]]):
    """This rank's slices of global batches ``start_batch .. num_batches - 1`` of one epoch."""

    def __init__(self, order: EpochOrder, epoch: int, start_batch: int, rank: int, world: int) -> None:
        order.local_batch_size(world)  # validates divisibility up front
        if not 0 <= start_batch <= order.num_batches:
            raise ValueError(f"start_batch {start_batch} outside [0, {order.num_batches}]")
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} out of range for world size {world}")
        self.order, self.epoch, self.start_batch, self.rank, self.world = (
            order,
            epoch,
            start_batch,
            rank,
            world,
        )

    def __len__(self) -> int:
        return self.order.num_batches - self.start_batch

    def __iter__(self) -> Iterator[list[int]]:
        for b in range(self.start_batch, self.order.num_batches):
            yield self.order.local_indices(self.epoch, b, self.rank, self.world).tolist()


def _collate(items: list[tuple[torch.Tensor, int, int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    images = torch.stack([it[0] for it in items])
    labels = torch.tensor([it[1] for it in items], dtype=torch.int64)
    indices = torch.tensor([it[2] for it in items], dtype=torch.int64)
    return images, labels, indices


def build_train_loader(
    dataset: IndexedImageDataset,
    order: EpochOrder,
    epoch: int,
    start_batch: int,
    rank: int,
    world: int,
    num_workers: int,
    pin_memory: bool = False,
) -> DataLoader:
    """Loader over batches ``start_batch..`` of ``epoch`` for ``rank``: (uint8 images, labels, indices).

    Build one per epoch (workers are not persistent: the epoch is baked into the dataset copy they get).
    """
    if len(dataset) != order.n:
        raise ValueError(f"dataset has {len(dataset)} samples but the order covers {order.n}")
    dataset.set_epoch(epoch)
    sampler = EpochBatchSampler(order, epoch, start_batch, rank, world)
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        collate_fn=_collate,
        pin_memory=pin_memory,
        persistent_workers=False,
    )


def batch_generator(seed: int, epoch: int, batch: int, device: torch.device | str = "cpu") -> torch.Generator:
    """Generator for the colour augmentation of global batch ``batch`` of ``epoch``.

    Seeded without the rank: pass ``row_offset=rank * local_batch, rows_total=global_batch`` to
    :class:`~invprop.data.augment.BatchColorAugment` so every rank draws the same global parameters.
    """
    return torch.Generator(device=device).manual_seed(derive_seed(seed, 0xC0104, epoch, batch))


def build_dataset(
    data_cfg: DataConfig,
    split: str,
    *,
    train: bool,
    seed: int = 0,
) -> IndexedImageDataset:
    """Load ``split`` with :func:`~invprop.data.datasets.load_split` and wrap it (train: random crops from the
    section's ``augment``)."""
    from invprop.data.datasets import load_split

    images, labels = load_split(data_cfg, split)
    return IndexedImageDataset.from_config(images, labels, data_cfg.augment, train=train, seed=seed)
