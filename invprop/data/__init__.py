"""Datasets, data order and the plain DataLoader (non-FFCV) path. A leaf: imports only invprop.data."""

from invprop.data.augment import BatchColorAugment, Normalize, eval_transform
from invprop.data.batches import eval_batches, is_lazy, materialize
from invprop.data.datasets import (
    DATASETS,
    dataset_size,
    eval_split,
    load_split,
    normalization,
    num_classes,
)
from invprop.data.fashion_mnist import load_fashion_mnist, read_idx
from invprop.data.geometric import geometric_augment, random_hflip, random_resized_crop
from invprop.data.loader import (
    EpochBatchSampler,
    IndexedImageDataset,
    batch_generator,
    build_dataset,
    build_train_loader,
)
from invprop.data.order import EpochOrder
from invprop.data.seeding import derive_seed
from invprop.data.synthetic import make_synthetic

__all__ = [
    "DATASETS",
    "BatchColorAugment",
    "EpochBatchSampler",
    "EpochOrder",
    "IndexedImageDataset",
    "Normalize",
    "batch_generator",
    "build_dataset",
    "build_train_loader",
    "dataset_size",
    "derive_seed",
    "eval_batches",
    "eval_split",
    "eval_transform",
    "geometric_augment",
    "is_lazy",
    "load_fashion_mnist",
    "load_split",
    "make_synthetic",
    "materialize",
    "normalization",
    "num_classes",
    "random_hflip",
    "random_resized_crop",
    "read_idx",
]
