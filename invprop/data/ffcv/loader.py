"""FFCV loaders with a resumable, world-size-independent order and seeded crops.

Training (:class:`FFCVTrainLoader`, also :func:`build_ffcv_train_loader`)
    One FFCV ``Loader`` per process, built once and reused for every epoch (each new ``Loader`` costs
    10-20 s of numba compilation). Its traversal order is :class:`~invprop.data.ffcv.order.ResumableOrder`,
    which returns exactly ``EpochOrder.local_indices(epoch, b, rank, world)`` for
    ``b = start_batch .. num_batches - 1``, concatenated; the wrapper sets ``(epoch, start_batch)`` before each
    epoch. Hence:

    * ranks get disjoint contiguous slices of every global batch, and the sequence of global batches is the
      same for any world size that divides the global batch;
    * **drop_last**: ``EpochOrder`` cuts every epoch to ``n // global_batch`` whole global batches, so the
      last ``n % global_batch`` samples of each epoch's permutation are not seen in that epoch (a different
      tail every epoch). Every rank gets exactly ``num_batches`` batches of ``global_batch // world``
      samples; nothing is padded or repeated (FFCV's ``distributed=True`` is not used: its DistributedSampler
      pads by repeating indices and drops per rank);
    * resuming at ``start_batch`` skips the earlier batches without reading or decoding them.

    Images are decoded and RandomResizedCrop-ed by FFCV (scale 0.2-1, aspect 3/4-4/3, area interpolation
    when shrinking) with the seeded boxes of :mod:`invprop.data.ffcv.decoder`, returned as uint8
    ``(B, 3, S, S)`` like the torchvision path; colour augmentation runs later in torch.

Evaluation (:class:`FFCVEvalLoader`, also :func:`build_ffcv_eval_loader`)
    Sequential over rank ``rank``'s contiguous shard of rows (:func:`invprop.data.order.shard_bounds`, the
    bank's split: the last rank takes the remainder), all samples (no drop_last), exact pixels when the stored
    images already have the requested size (else a centred square, ``center_crop_ratio`` of the shorter side,
    resized to it).

Batches are ``(images uint8 (B, 3, S, S), labels int64 (B,), indices int64 (B,))``: fresh tensors that do
not alias FFCV's reused buffers.

Side effects of FFCV: ``Loader(num_workers=n)`` sets torch's intra-op thread count to ``n``; the wrappers
restore the caller's value after building and after the first batch of each pass.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ffcv.fields.decoders import IntDecoder
from ffcv.loader import Loader
from ffcv.transforms import ToTensor, ToTorchImage

from invprop.data.crop import CROP_RATIO, crop_epoch_key
from invprop.data.ffcv import compat
from invprop.data.ffcv.decoder import SeededRandomResizedCropDecoder
from invprop.data.ffcv.order import ResumableOrder, ShardOrder
from invprop.data.order import EpochOrder

__all__ = [
    "FFCVEvalLoader",
    "FFCVTrainLoader",
    "build_ffcv_eval_loader",
    "build_ffcv_train_loader",
    "usable_cores",
]

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity mask, as SLURM's cgroups set it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _image_sizes(beton_path: str) -> tuple[int, np.ndarray, np.ndarray]:
    """Samples in the file and the stored height and width of each image; checks the fields first."""
    n, tables = compat.read_metadata(beton_path)
    missing = [f for f in ("image", "label", "index") if f not in tables]
    if missing:
        raise ValueError(f"{beton_path} lacks fields {missing} (has {list(tables)})")
    meta = tables["image"]
    return n, np.asarray(meta["height"]), np.asarray(meta["width"])


def _pipelines(decoder: SeededRandomResizedCropDecoder) -> dict[str, list]:
    return {
        "image": [decoder, ToTensor(), ToTorchImage(channels_last=True)],
        "label": [IntDecoder(), ToTensor()],
        "index": [IntDecoder(), ToTensor()],
    }


def _to_batch(out: tuple, channels_last: bool) -> Batch:
    images, labels, indices = out
    if channels_last:
        images = images.clone(memory_format=torch.channels_last)
    else:
        images = images.contiguous()
        if images.data_ptr() == out[0].data_ptr():
            images = images.clone()
    labels = labels.reshape(-1).to(torch.int64, copy=True)
    indices = indices.reshape(-1).to(torch.int64, copy=True)
    return images, labels, indices


class _Pass:
    """One pass over a Loader: iterates batches, remembers its position, and can be closed early."""

    def __init__(self, owner: _LoaderBase, it: Any, n_batches: int, first_batch: int, epoch: int) -> None:
        self._owner = owner
        self._it = it
        self.epoch = epoch
        self.next_batch = first_batch
        self._end = first_batch + n_batches
        self._restored = False

    def __len__(self) -> int:
        return self._end - self.next_batch

    def __iter__(self) -> _Pass:
        return self

    def __next__(self) -> Batch:
        if self._it is None or self.next_batch >= self._end:
            self.close()
            raise StopIteration
        try:
            out = compat.next_batch(self._it)
        except StopIteration:
            self.close()
            raise
        if not self._restored:
            # The loader thread has set torch's thread count by now (it does so before its first batch).
            torch.set_num_threads(self._owner._torch_threads)
            self._restored = True
        self.next_batch += 1
        return _to_batch(out, self._owner.channels_last)

    def close(self) -> None:
        it, self._it = self._it, None
        if it is not None:
            compat.stop_iterator(it)
        if self._owner._active is self:
            self._owner._active = None


class _LoaderBase:
    loader: Loader
    channels_last: bool

    def __init__(self) -> None:
        self._active: _Pass | None = None
        self._torch_threads = torch.get_num_threads()

    def _build(self, **kwargs: Any) -> Loader:
        threads = torch.get_num_threads()
        # FFCV refuses more worker threads than the cores this process may use (a recipe's 8 on a 2-core box)
        kwargs["num_workers"] = max(1, min(int(kwargs["num_workers"]), usable_cores()))
        try:
            return Loader(**kwargs)
        finally:
            torch.set_num_threads(threads)

    def _start(self, epoch: int) -> Any:
        if self._active is not None:
            self._active.close()
        self._torch_threads = torch.get_num_threads()
        return compat.start_epoch(self.loader, epoch)

    def close(self) -> None:
        """Stop the pass in progress (its prefetch thread), if any."""
        if self._active is not None:
            self._active.close()


class FFCVTrainLoader(_LoaderBase):
    """Training batches of rank ``rank`` from one reusable FFCV ``Loader``; iterate with ``.epoch(e, start_batch)``.

    Build it once per process. Use the same ``order`` (same n, global batch, seed) and ``seed`` on every rank;
    ``seed`` keys the crops (with the epoch and the dataset index). See the module docstring for order,
    drop_last and resume rules.
    """

    def __init__(
        self,
        beton_path: str | Path,
        order: EpochOrder,
        rank: int,
        world: int,
        num_workers: int,
        image_size: int,
        seed: int,
        *,
        scale: tuple[float, float] = (0.2, 1.0),
        ratio: tuple[float, float] = CROP_RATIO,
        crop: bool = True,
        flip: bool = False,
        batches_ahead: int = 3,
        os_cache: bool = True,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        beton_path = str(beton_path)
        n, _, _ = _image_sizes(beton_path)
        if order.n != n:
            raise ValueError(f"the order covers {order.n} samples but {beton_path} holds {n}")
        self.beton_path = beton_path
        self.order = order
        self.rank, self.world = int(rank), int(world)
        self.seed = int(seed)
        self.channels_last = bool(channels_last)
        self.traversal = ResumableOrder(order, rank, world)
        self.decoder = SeededRandomResizedCropDecoder(
            (int(image_size), int(image_size)), scale=scale, ratio=ratio, crop=crop, flip=flip
        )
        self.decoder.set_epoch_key(crop_epoch_key(self.seed, 0))
        self.loader = self._build(
            fname=beton_path,
            batch_size=self.traversal.local_batch,
            num_workers=int(num_workers),
            os_cache=os_cache,
            order=self.traversal,
            distributed=False,
            seed=self.seed,
            pipelines=_pipelines(self.decoder),
            drop_last=True,
            batches_ahead=int(batches_ahead),
        )

    @property
    def batch_size(self) -> int:
        """Samples per batch on this rank (``global_batch // world``)."""
        return self.traversal.local_batch

    @property
    def num_batches(self) -> int:
        """Batches per epoch (the same on every rank)."""
        return self.order.num_batches

    def __len__(self) -> int:
        return self.num_batches

    def epoch(self, epoch: int, start_batch: int = 0) -> _Pass:
        """Batches ``start_batch ..`` of ``epoch``; the returned iterator's ``next_batch`` is the position to
        checkpoint. Starting a new pass stops the previous one."""
        nb = self.num_batches
        if not 0 <= start_batch <= nb:
            raise ValueError(f"start_batch {start_batch} out of range [0, {nb}]")
        if self._active is not None:
            self._active.close()
        if start_batch == nb:
            return _Pass(self, None, 0, nb, epoch)
        self.traversal.start_batch = int(start_batch)
        self.decoder.set_epoch_key(crop_epoch_key(self.seed, epoch))
        it = self._start(epoch)
        self._active = _Pass(self, it, nb - start_batch, start_batch, epoch)
        return self._active


class FFCVEvalLoader(_LoaderBase):
    """All rows of rank ``rank``'s shard (or the given ``rows``, ``(start, stop)``) in file order, for feature
    extraction / kNN / linear probes."""

    def __init__(
        self,
        beton_path: str | Path,
        batch_size: int,
        num_workers: int,
        image_size: int,
        *,
        rank: int = 0,
        world: int = 1,
        rows: tuple[int, int] | None = None,
        center_crop_ratio: float | None = None,
        batches_ahead: int = 3,
        os_cache: bool = True,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        beton_path = str(beton_path)
        n, heights, widths = _image_sizes(beton_path)
        self.beton_path = beton_path
        self.channels_last = bool(channels_last)
        self.traversal = ShardOrder(n, rank, world)
        if rows is not None:  # explicit rows [start, stop) instead of the rank's shard
            start, stop = int(rows[0]), int(rows[1])
            if not 0 <= start <= stop <= n:
                raise ValueError(f"rows {rows} are not within the {n} rows of {beton_path}")
            self.traversal.start, self.traversal.stop = start, stop
        self.start, self.stop = self.traversal.start, self.traversal.stop
        s = int(image_size)
        constant = heights.min() == heights.max() == s and widths.min() == widths.max() == s
        ratio = 1.0 if center_crop_ratio is None else float(center_crop_ratio)
        self.decoder = SeededRandomResizedCropDecoder(
            (s, s), crop="none" if constant and ratio == 1.0 else "center", center_ratio=ratio
        )
        self.batch_size = int(batch_size)
        self.loader = self._build(
            fname=beton_path,
            batch_size=self.batch_size,
            num_workers=int(num_workers),
            os_cache=os_cache,
            order=self.traversal,
            distributed=False,
            seed=0,
            pipelines=_pipelines(self.decoder),
            drop_last=False,
            batches_ahead=int(batches_ahead),
        )

    @property
    def num_samples(self) -> int:
        return self.stop - self.start

    def __len__(self) -> int:
        return -(-self.num_samples // self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        if self._active is not None:
            self._active.close()
        if self.num_samples == 0:
            return iter(())
        self._active = _Pass(self, self._start(0), len(self), 0, 0)
        return self._active


# The builders are the classes themselves: same arguments, one definition each.
build_ffcv_train_loader = FFCVTrainLoader
build_ffcv_eval_loader = FFCVEvalLoader
