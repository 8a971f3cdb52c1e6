"""FFCV loaders with a resumable, world-size-independent order and seeded crops.

Training (:func:`build_ffcv_train_loader`)
    One FFCV ``Loader`` per process, built once and reused for every epoch (each new ``Loader`` costs
    10-20 s of numba compilation). Its traversal order is :class:`ResumableOrder`, which returns exactly
    ``EpochOrder.local_indices(epoch, b, rank, world)`` for ``b = start_batch .. num_batches - 1``,
    concatenated; the wrapper sets ``(epoch, start_batch)`` before each epoch. Hence:

    * ranks get disjoint contiguous slices of every global batch, and the sequence of global batches is the
      same for any world size that divides the global batch;
    * **drop_last**: ``EpochOrder`` cuts every epoch to ``n // global_batch`` whole global batches, so the
      last ``n % global_batch`` samples of each epoch's permutation are not seen in that epoch (a different
      tail every epoch). Every rank gets exactly ``num_batches`` batches of ``global_batch // world``
      samples; nothing is padded or repeated (FFCV's ``distributed=True`` is not used: its DistributedSampler
      pads by repeating indices and drops per rank);
    * resuming at ``start_batch`` skips the earlier batches without reading or decoding them.

    Images are decoded and RandomResizedCrop-ed by FFCV (scale 0.2-1, aspect 3/4-4/3, area interpolation
    when shrinking), returned as uint8 ``(B, 3, S, S)`` like the torchvision path; colour augmentation runs
    later in torch.

    **Seeded crops.** FFCV 1.0.2's ``RandomResizedCropRGBImageDecoder`` draws crops with ``np.random`` inside
    numba ``prange`` threads: every worker thread has its own generator state, seeded from OS entropy when the
    thread first uses it, and which thread handles which sample depends on the scheduler. ``Loader(seed=...)``
    only seeds the order of FFCV's own ``RANDOM`` traversal, never the crops, and ``np.random.seed`` in the
    main thread does not reach numba's per-thread states. So FFCV's crops cannot be reproduced, let alone
    resumed mid-epoch. :class:`SeededRandomResizedCropDecoder` (a subclass of FFCV's decoder, same decode
    and resize code) instead draws each sample's crop from a counter-based hash of
    ``(seed, epoch, dataset index)``: the crop of a sample in an epoch is the same on any rank, for any world
    size, batch position, thread count, and after any resume. The per-epoch key lives in a small numpy array
    that the compiled decoder reads at run time (through its address), so changing epochs needs no
    recompilation.

Evaluation (:func:`build_ffcv_eval_loader`)
    Sequential over rank ``rank``'s contiguous shard of rows (as ``invprop.bank.shard_bounds``: the last
    rank takes the remainder), all samples (no drop_last), exact pixels when the stored images already have
    the requested size (else a centred square, ``center_crop_ratio`` of the shorter side, resized to it).

Batches are ``(images uint8 (B, 3, S, S), labels int64 (B,), indices int64 (B,))``: fresh tensors that do
not alias FFCV's reused buffers.

Side effects of FFCV: ``Loader(num_workers=n)`` sets torch's intra-op thread count to ``n``; the wrappers
restore the caller's value after building and after the first batch of each pass.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import queue
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ffcv.fields.basics import IntDecoder
from ffcv.fields.rgb_image import IMAGE_MODES, RandomResizedCropRGBImageDecoder
from ffcv.libffcv import ctypes_imdecode, ctypes_resize
from ffcv.loader import Loader
from ffcv.loader.epoch_iterator import IS_CUDA as _FFCV_CUDA
from ffcv.pipeline.compiler import Compiler
from ffcv.reader import Reader
from ffcv.transforms import ToTensor, ToTorchImage
from ffcv.traversal_order.base import TraversalOrder
from numba import njit

from invprop.data.crop import CROP_STREAM, crop_box, crop_epoch_key, flip_bit, sample_crop, sample_key
from invprop.data.order import EpochOrder, shard_bounds

__all__ = [
    "CROP_STREAM",
    "FFCVEvalLoader",
    "FFCVTrainLoader",
    "ResumableOrder",
    "SeededRandomResizedCropDecoder",
    "ShardOrder",
    "build_ffcv_eval_loader",
    "build_ffcv_train_loader",
    "crop_epoch_key",
    "sample_crop",
]

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity mask, as SLURM's cgroups set it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


# ----------------------------------------------------------------------------------------------------
# Traversal orders
# ----------------------------------------------------------------------------------------------------


class _BoundOrder(TraversalOrder):
    """A TraversalOrder created before its Loader. FFCV 1.0.2's ``Loader`` accepts an *instance* as ``order``
    and calls it with itself (``order(loader)``); ``__call__`` binds and returns the same object, so the
    caller keeps a handle to change the position between epochs."""

    def __init__(self) -> None:  # TraversalOrder.__init__ needs the loader; it runs in __call__
        self.loader = None

    def __call__(self, loader: Loader) -> _BoundOrder:
        if self.loader is not None and self.loader is not loader:
            raise RuntimeError("an order object can serve one Loader only")
        TraversalOrder.__init__(self, loader)
        return self


class ResumableOrder(_BoundOrder):
    """Rank ``rank``'s part of ``EpochOrder``: batches ``start_batch ..`` of epoch ``epoch``, concatenated."""

    def __init__(self, order: EpochOrder, rank: int, world: int) -> None:
        super().__init__()
        self.order = order
        self.rank = int(rank)
        self.world = int(world)
        self.local_batch = order.local_batch_size(world)  # raises if world does not divide the global batch
        if not 0 <= self.rank < self.world:
            raise ValueError(f"rank {rank} out of range for world size {world}")
        self.start_batch = 0

    @property
    def num_batches(self) -> int:
        return self.order.num_batches

    def sample_order(self, epoch: int) -> np.ndarray:
        parts = [
            self.order.local_indices(epoch, b, self.rank, self.world)
            for b in range(self.start_batch, self.order.num_batches)
        ]
        if not parts:
            return np.zeros(0, dtype=np.uint64)
        return torch.cat(parts).numpy().astype(np.uint64)


class ShardOrder(_BoundOrder):
    """Rows ``[start, stop)`` in file order (evaluation)."""

    def __init__(self, start: int, stop: int) -> None:
        super().__init__()
        self.start, self.stop = int(start), int(stop)

    def sample_order(self, epoch: int) -> np.ndarray:
        return np.arange(self.start, self.stop, dtype=np.uint64)


# ----------------------------------------------------------------------------------------------------
# Seeded crop
# ----------------------------------------------------------------------------------------------------


_jit = njit(nogil=True, error_model="numpy")


@_jit
def _center_box(height, width, ratio):
    """Centred square of side ``ratio * min(height, width)``: ``(top, left, side, side)``."""
    side = max(1, min(height, width, int(ratio * min(height, width))))
    return (height - side) // 2, (width - side) // 2, side, side


_libc = ctypes.CDLL("libc.so.6")
_memcpy_u64 = _libc.memcpy
_memcpy_u64.argtypes = [ctypes.c_uint64, ctypes.c_uint64, ctypes.c_uint64]
_memcpy_u64.restype = ctypes.c_uint64


class SeededRandomResizedCropDecoder(RandomResizedCropRGBImageDecoder):
    """FFCV's RandomResizedCrop decoder (same JPEG decode, same crop-and-resize kernel) with crops drawn from
    ``(epoch key, dataset index)`` instead of numba's per-thread ``np.random`` (see the module docstring).

    ``crop``: ``"random"`` (or True; RandomResizedCrop with ``scale`` / ``ratio``), ``"center"`` (a centred
    square of side ``center_ratio * min(h, w)``) or ``"none"`` (or False; the whole image). Each is resized
    to ``output_size`` (exact pixels when the region already has that size). ``flip=True`` adds a seeded
    horizontal flip with probability 1/2. Set the epoch with :meth:`set_epoch_key`.
    """

    def __init__(
        self,
        output_size: tuple[int, int],
        scale: tuple[float, float] = (0.2, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        *,
        crop: bool | str = True,
        flip: bool = False,
        center_ratio: float = 1.0,
    ) -> None:
        super().__init__(output_size, scale=tuple(scale), ratio=tuple(ratio))
        modes = {True: "random", False: "none", "random": "random", "center": "center", "none": "none"}
        if crop not in modes:
            raise ValueError(f"crop must be 'random', 'center', 'none' or a bool, got {crop!r}")
        self.crop = modes[crop]
        self.flip = bool(flip)
        self.center_ratio = float(center_ratio)
        if not 0 < self.center_ratio <= 1:
            raise ValueError(f"center_ratio must be in (0, 1], got {center_ratio}")
        # Read by the compiled decoder at every batch; must stay alive as long as the Loader (it does: self).
        self._state = np.zeros(1, dtype=np.uint64)

    def set_epoch_key(self, key: int) -> None:
        self._state[0] = np.uint64(int(key) & 0xFFFFFFFFFFFFFFFF)

    def generate_code(self):
        sample_key_, crop_box_, flip_bit_ = sample_key, crop_box, flip_bit
        mem_read = self.memory_read
        my_range = Compiler.get_iterator()
        # FFCV's C functions, called through ctypes straight from this compiled function. (FFCV's decoders
        # wrap them in small numba functions compiled per Loader; sharing such wrappers between Loaders hits
        # a numba KeyError on their literal-argument overloads, and collecting them prints the same error.)
        imdecode_c = ctypes_imdecode
        resize_c = ctypes_resize
        center_box = _center_box
        memcpy_u64 = _memcpy_u64
        state_addr = np.uint64(self._state.ctypes.data)
        jpg = IMAGE_MODES["jpg"]
        zero, one, false = np.uint32(0), np.uint32(1), False
        mode = {"none": 0, "random": 1, "center": 2}[self.crop]
        center_ratio = self.center_ratio
        do_flip = self.flip
        scale_lo, scale_hi = float(self.scale[0]), float(self.scale[1])
        log_r_lo, log_r_hi = float(np.log(self.ratio[0])), float(np.log(self.ratio[1]))

        def decode(batch_indices, my_storage, metadata, storage_state):
            destination, temp_storage = my_storage
            state = np.empty(1, dtype=np.uint64)
            memcpy_u64(np.uint64(state.ctypes.data), state_addr, np.uint64(8))
            epoch_key = state[0]
            for dst_ix in my_range(len(batch_indices)):
                source_ix = batch_indices[dst_ix]
                field = metadata[source_ix]
                image_data = mem_read(field["data_ptr"], storage_state)
                height = np.uint32(field["height"])
                width = np.uint32(field["width"])
                if field["mode"] == jpg:
                    temp_buffer = temp_storage[dst_ix]
                    imdecode_c(
                        image_data.ctypes.data, image_data.size, height, width, temp_buffer.ctypes.data,
                        height, width, zero, zero, one, one, false, false,
                    )
                    n_bytes = 3 * height * width
                    image = temp_buffer.reshape(-1)[:n_bytes].reshape(height, width, 3)
                else:
                    image = image_data.reshape(height, width, 3)
                key = sample_key_(epoch_key, source_ix)
                hh = np.int64(height)
                ww = np.int64(width)
                if mode == 1:
                    top, left, ch_, cw = crop_box_(key, hh, ww, scale_lo, scale_hi, log_r_lo, log_r_hi)
                elif mode == 2:
                    top, left, ch_, cw = center_box(hh, ww, center_ratio)
                else:
                    top, left, ch_, cw = 0, 0, hh, ww
                out = destination[dst_ix]
                resize_c(
                    0, image.ctypes.data, hh, ww, top, top + ch_, left, left + cw,
                    out.ctypes.data, out.shape[0], out.shape[1],
                )
                if do_flip and flip_bit_(key):
                    n_cols = out.shape[1]
                    for r in range(out.shape[0]):
                        for c in range(n_cols // 2):
                            for k in range(3):
                                tmp = out[r, c, k]
                                out[r, c, k] = out[r, n_cols - 1 - c, k]
                                out[r, n_cols - 1 - c, k] = tmp
            return destination[: len(batch_indices)]

        decode.is_parallel = True
        return decode


# ----------------------------------------------------------------------------------------------------
# Loader wrappers
# ----------------------------------------------------------------------------------------------------


def _image_sizes(beton_path: str) -> tuple[int, np.ndarray, np.ndarray]:
    reader = Reader(str(beton_path))
    f_ix = list(reader.handlers).index("image")
    meta = reader.metadata[f"f{f_ix}"]
    return int(reader.num_samples), np.asarray(meta["height"]), np.asarray(meta["width"])


def _check_fields(beton_path: str) -> None:
    reader = Reader(str(beton_path))
    missing = [f for f in ("image", "label", "index") if f not in reader.handlers]
    if missing:
        raise ValueError(f"{beton_path} lacks fields {missing} (has {list(reader.handlers)})")


def _int_pipeline() -> list:
    return [IntDecoder(), ToTensor()]


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


def _next_batch(it: Any) -> tuple:
    """``EpochIterator.__next__`` that cannot hang: FFCV's blocks forever on its queue when the loader
    thread died (e.g. a numba compilation error), since the end marker is then never queued."""
    while True:
        try:
            item = it.output_queue.get(timeout=1.0)
            break
        except queue.Empty:
            if not it.is_alive():
                try:
                    item = it.output_queue.get_nowait()
                    break
                except queue.Empty:
                    raise RuntimeError(
                        "FFCV's loader thread stopped without finishing the epoch; its exception was "
                        "reported by threading.excepthook (printed to stderr by default)"
                    ) from None
    if item is None:
        it.close()
        raise StopIteration
    slot, result = item
    if _FFCV_CUDA:
        it.current_stream.wait_stream(it.cuda_streams[slot])
    return result


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
            out = _next_batch(self._it)
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
            it.close()
            # FFCV's thread only checks the stop flag while its queue is full, and its final end-of-epoch
            # marker is put without a timeout: drain the queue so it can always reach the end and exit.
            deadline = time.monotonic() + 120
            while it.is_alive() and time.monotonic() < deadline:
                with contextlib.suppress(queue.Empty):
                    while True:
                        it.output_queue.get_nowait()
                it.join(timeout=0.05)
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
        self.loader.next_epoch = int(epoch)
        return iter(self.loader)

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
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        crop: bool = True,
        flip: bool = False,
        batches_ahead: int = 3,
        os_cache: bool = True,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        beton_path = str(beton_path)
        _check_fields(beton_path)
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
            pipelines={
                "image": [self.decoder, ToTensor(), ToTorchImage(channels_last=True)],
                "label": _int_pipeline(),
                "index": _int_pipeline(),
            },
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
    """All rows of rank ``rank``'s shard in file order, for feature extraction / kNN / linear probes."""

    def __init__(
        self,
        beton_path: str | Path,
        batch_size: int,
        num_workers: int,
        image_size: int,
        *,
        rank: int = 0,
        world: int = 1,
        center_crop_ratio: float | None = None,
        batches_ahead: int = 3,
        os_cache: bool = True,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        beton_path = str(beton_path)
        _check_fields(beton_path)
        n, heights, widths = _image_sizes(beton_path)
        self.beton_path = beton_path
        self.channels_last = bool(channels_last)
        if not 0 <= int(rank) < int(world):
            raise ValueError(f"rank {rank} out of range for world size {world}")
        # The bank's split (contiguous, the last rank takes the remainder): the same function, not a copy.
        self.start, self.stop = shard_bounds(n, int(rank), int(world))
        self.traversal = ShardOrder(self.start, self.stop)
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
            pipelines={
                "image": [self.decoder, ToTensor(), ToTorchImage(channels_last=True)],
                "label": _int_pipeline(),
                "index": _int_pipeline(),
            },
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
