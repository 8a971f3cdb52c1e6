"""Where training batches come from: one `BatchSource` per process, chosen once from `data.format`.

FFCV's loader, the resident images (`data.format=device`) and the torchvision loader all answer
`epoch(epoch, batch)` with this rank's (images, labels, indices) batches from that data position on, so the
training loop never asks which one it has. `name` says which loader actually runs: `data.format=ffcv` falls
back to the torchvision loader where FFCV does not import.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch

from invprop.config.data_schema import DataFormat
from invprop.data.device_batches import DeviceBatches
from invprop.data.loader import IndexedImageDataset, build_train_loader
from invprop.data.order import EpochOrder

if TYPE_CHECKING:
    from invprop.config.data_schema import DataConfig

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class BatchSource(Protocol):
    name: str  # the loader that runs: ffcv, torchvision or device

    def epoch(self, epoch: int, batch: int) -> Iterable[Batch]: ...


class TorchvisionBatches:
    """The torchvision path: a DataLoader over the images in memory (or on disk), rebuilt each epoch."""

    name = "torchvision"

    def __init__(self, dataset: IndexedImageDataset, order: EpochOrder, rank: int, world: int, workers: int,
                 pin_memory: bool) -> None:
        self.dataset, self.order, self.rank, self.world = dataset, order, rank, world
        self.workers, self.pin_memory = workers, pin_memory

    def epoch(self, epoch: int, batch: int) -> Iterable[Batch]:
        return build_train_loader(self.dataset, self.order, epoch, batch, self.rank, self.world, self.workers,
                                  pin_memory=self.pin_memory)


class ResidentBatches:
    """`data.format=device`: this rank's part of DeviceBatches' global batches."""

    name = "device"

    def __init__(self, batches: DeviceBatches, rank: int, world: int) -> None:
        self.batches, self.rank, self.world = batches, rank, world

    def epoch(self, epoch: int, batch: int) -> Iterable[Batch]:
        return self.batches.epoch(epoch, batch, self.rank, self.world)


class FFCVBatches:
    """FFCV's loader, built once per process and reused every epoch (its pipeline compiles once)."""

    name = "ffcv"

    def __init__(self, loader: object) -> None:
        self.loader = loader

    def epoch(self, epoch: int, batch: int) -> Iterable[Batch]:
        return self.loader.epoch(epoch, batch)  # type: ignore[attr-defined]


def ffcv_available(say: bool) -> bool:
    """Whether FFCV imports (an optional extra: sites that cannot build it train through torchvision); says
    so once, on the main rank, when it does not."""
    try:
        import ffcv  # noqa: F401
    except ImportError as exc:
        if say:
            print(f"data.format=ffcv but FFCV is not installed ({exc}); training through the torchvision "
                  "loader instead (`pip install invprop[ffcv]` for the FFCV path)", file=sys.stderr, flush=True)
        return False
    return True


def build_batch_source(data: DataConfig, images: torch.Tensor, labels: torch.Tensor, order: EpochOrder, *,
                       seed: int, workers: int, rank: int, world: int, device: torch.device,
                       is_main: bool) -> BatchSource:
    """The source `data.format` names, or the torchvision loader when it names FFCV and FFCV does not import."""
    aug = data.augment
    if data.format == DataFormat.ffcv and ffcv_available(is_main):
        from invprop.collectives import Comm
        from invprop.data.beton_cache import ensure_beton_world
        from invprop.data.ffcv.loader import build_ffcv_train_loader

        # rank 0 checks the file once for the job (the default group holds every rank)
        beton = ensure_beton_world(data, "train", Path(data.beton_dir), Comm(rank, world, device),
                                   progress=is_main)
        return FFCVBatches(build_ffcv_train_loader(beton, order, rank, world, workers, data.image_size, seed,
                                                   scale=tuple(aug.crop_scale), flip=aug.flip))
    if data.format == DataFormat.device:
        resident = DeviceBatches(images, labels, order, seed=seed, out_size=int(images.shape[-1]),
                                 crop_scale=tuple(aug.crop_scale), flip=aug.flip, device=device)
        return ResidentBatches(resident, rank, world)
    dataset = IndexedImageDataset.from_config(images, labels, aug, train=True, seed=seed)
    return TorchvisionBatches(dataset, order, rank, world, workers, pin_memory=device.type == "cuda")
