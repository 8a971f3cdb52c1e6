"""The image decoder of the FFCV loaders: FFCV's JPEG decode and crop-and-resize kernel, with seeded crops.

FFCV 1.0.2's ``RandomResizedCropRGBImageDecoder`` draws crops with ``np.random`` inside numba ``prange``
threads: every worker thread has its own generator state, seeded from OS entropy when the thread first uses
it, and which thread handles which sample depends on the scheduler. ``Loader(seed=...)`` only seeds the order
of FFCV's own ``RANDOM`` traversal, never the crops, and ``np.random.seed`` in the main thread does not reach
numba's per-thread states. So FFCV's crops cannot be reproduced, let alone resumed mid-epoch.
:class:`SeededRandomResizedCropDecoder` (a subclass of FFCV's decoder, same decode and resize code) instead
draws each sample's crop with :func:`invprop.data.crop.crop_box` from a counter-based hash of
``(seed, epoch, dataset index)``, the box the torchvision path uses too: the crop of a sample in an epoch is
the same on any rank, for any world size, batch position, thread count, and after any resume. The per-epoch
key lives in a small numpy array that the compiled decoder reads at run time (through its address), so
changing epochs needs no recompilation.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable

import numpy as np
from ffcv.fields.decoders import RandomResizedCropRGBImageDecoder
from numba import njit

from invprop.data.crop import CROP_RATIO, crop_box, flip_bit, sample_key
from invprop.data.ffcv import compat

__all__ = ["SeededRandomResizedCropDecoder"]

_jit = njit(nogil=True, error_model="numpy")


@_jit
def _center_box(height, width, ratio):
    """Centred square of side ``ratio * min(height, width)``: ``(top, left, side, side)``."""
    side = max(1, min(height, width, int(ratio * min(height, width))))
    return (height - side) // 2, (width - side) // 2, side, side


# memcpy, callable from compiled code: how the decoder reads the epoch key that Python changes between epochs.
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
        ratio: tuple[float, float] = CROP_RATIO,
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
        """Crops from now on are those of the epoch whose key is ``key`` (:func:`~invprop.data.crop.crop_epoch_key`)."""
        self._state[0] = np.uint64(int(key) & 0xFFFFFFFFFFFFFFFF)

    def generate_code(self) -> Callable:
        """FFCV's hook for a pipeline operation: the function that FFCV compiles into the Loader's pipeline."""
        sample_key_, crop_box_, flip_bit_ = sample_key, crop_box, flip_bit
        mem_read = self.memory_read  # set by FFCV on its decoders before it asks for the code
        my_range = compat.parallel_range()
        imdecode_c = compat.imdecode
        resize_c = compat.resize
        center_box = _center_box
        memcpy_u64 = _memcpy_u64
        state_addr = np.uint64(self._state.ctypes.data)
        jpg = compat.JPG_MODE
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
