"""The one RandomResizedCrop box (and flip draw) of the training data, shared by both loaders.

A sample's box is a pure function of ``(seed, epoch, dataset index, image height, image width)``: the FFCV
decoder (``invprop.data.ffcv.decoder``) inlines these compiled functions in its numba pipeline, and the
torchvision path (``invprop.data.loader``) calls the very same functions per sample, so the two paths crop
the same sample the same way in the same epoch, on any rank, world size, batch position or after a resume.

Random numbers come from a counter-based SplitMix64 hash of ``(epoch key, index, counter)``: no generator
state, so no per-thread state to seed inside numba's parallel loops. numba is required (it also compiles
FFCV's pipelines); the functions are compiled on first use (about a second) and cached on disk.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from invprop.data.seeding import derive_seed

__all__ = ["CROP_ATTEMPTS", "CROP_RATIO", "CROP_STREAM", "box_from_uniforms", "crop_box", "crop_epoch_key",
           "flip_bit", "sample_crop", "sample_crops", "sample_key", "stored_size"]

# The aspect-ratio range of every training crop (both loaders and the resident batches draw with it).
CROP_RATIO = (3 / 4, 4 / 3)
# Stream tag mixed into the crop seed so crops never share random numbers with other users of derive_seed.
CROP_STREAM = 0xC0FFC7

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_INV53 = 1.0 / 9007199254740992.0  # 2**-53

# cache=True: compiled once per source version into __pycache__, not in every process (about a second each).
_jit = njit(nogil=True, error_model="numpy", cache=True)


@_jit
def _mix64(z):
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


@_jit
def _uniform(key, counter):
    """Uniform float in [0, 1) from (key, counter): the top 53 bits of a SplitMix64 output."""
    return float(_mix64(np.uint64(key) + np.uint64(counter + 1) * _GOLDEN) >> np.uint64(11)) * _INV53


@_jit
def sample_key(epoch_key, index):
    """The 64-bit key of one sample in one epoch (``epoch_key`` from :func:`crop_epoch_key`)."""
    return _mix64(np.uint64(epoch_key) ^ _mix64(np.uint64(index) * _GOLDEN + np.uint64(1)))


# Uniform draws per crop proposal and their columns in the ``draws`` array of :func:`box_from_uniforms`.
CROP_ATTEMPTS = 10
U_AREA, U_ASPECT, U_TOP, U_LEFT = 0, 1, 2, 3


@_jit
def box_from_uniforms(height, width, scale_lo, scale_hi, log_r_lo, log_r_hi, r_lo, r_hi, draws):
    """The RandomResizedCrop box ``(top, left, h, w)`` that uniform draws in [0, 1) select: the one sampler of
    both the training crops (:func:`crop_box`, hashed draws) and the linear probe's (``invprop.data.geometric``,
    ``torch.Generator`` draws); each caller keeps its own draws, so its random stream stays what it was.

    ``draws`` is ``(attempts, 4)``: per proposal the area share, the log aspect, then the top and left
    position (columns ``U_*``). The first proposal that fits is placed; otherwise the largest centred box with
    its aspect clamped into ``[r_lo, r_hi]``. The clamp bounds are parameters, not ``exp(log_r_*)``, because
    the two callers differ there: :func:`crop_box` only receives log ratios (FFCV's compiled decoder passes
    them) and clamps to ``exp(log r)``, the probe clamps to ``r`` itself; the two can differ in the last bit,
    and unifying them could move a fallback box by a pixel.
    """
    area = float(height) * float(width)
    for attempt in range(draws.shape[0]):
        share = scale_lo + (scale_hi - scale_lo) * draws[attempt, U_AREA]
        aspect = math.exp(log_r_lo + (log_r_hi - log_r_lo) * draws[attempt, U_ASPECT])
        w = int(round(math.sqrt(area * share * aspect)))
        h = int(round(math.sqrt(area * share / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = min(int(draws[attempt, U_TOP] * (height - h + 1)), height - h)
            left = min(int(draws[attempt, U_LEFT] * (width - w + 1)), width - w)
            return top, left, h, w
    in_ratio = float(width) / float(height)
    if in_ratio < r_lo:
        w = width
        h = min(height, int(round(w / r_lo)))
    elif in_ratio > r_hi:
        h = height
        w = min(width, int(round(h * r_hi)))
    else:
        w = width
        h = height
    return (height - h) // 2, (width - w) // 2, h, w


@_jit
def crop_box(key, height, width, scale_lo, scale_hi, log_r_lo, log_r_hi):
    """RandomResizedCrop box ``(top, left, h, w)`` of the sample whose key is ``key``: :func:`box_from_uniforms`
    of the hashed uniforms ``4 * attempt + column``."""
    draws = np.empty((CROP_ATTEMPTS, 4))
    for attempt in range(CROP_ATTEMPTS):
        for column in range(4):
            draws[attempt, column] = _uniform(key, 4 * attempt + column)
    return box_from_uniforms(height, width, scale_lo, scale_hi, log_r_lo, log_r_hi,
                             np.exp(log_r_lo), np.exp(log_r_hi), draws)


@_jit
def flip_bit(key):
    """The horizontal-flip draw of a sample (used when flipping is on), independent of its box draws."""
    return _uniform(key, 1000) < 0.5


def crop_epoch_key(seed: int, epoch: int) -> int:
    """The 64-bit key from which every crop of ``epoch`` is derived."""
    return derive_seed(int(seed), CROP_STREAM, int(epoch))


def sample_crop(
    seed: int,
    epoch: int,
    index: int,
    height: int,
    width: int,
    scale: tuple[float, float] = (0.2, 1.0),
    ratio: tuple[float, float] = CROP_RATIO,
) -> tuple[int, int, int, int, bool]:
    """``(top, left, h, w, flip)`` of sample ``index`` (an image of ``height x width``) in ``epoch``.
    ``flip`` is the draw used when flipping is on (ignored otherwise)."""
    # Keys stay uint64 (a Python int below 2**63 would be typed int64, and int64 op uint64 is float64).
    key = np.uint64(sample_key(np.uint64(crop_epoch_key(seed, epoch)), np.uint64(index)))
    top, left, h, w = crop_box(
        key, np.int64(height), np.int64(width), float(scale[0]), float(scale[1]),
        float(np.log(ratio[0])), float(np.log(ratio[1])),
    )
    return int(top), int(left), int(h), int(w), bool(flip_bit(key))


@_jit
def _crops_of(epoch_key, indices, height, width, scale_lo, scale_hi, log_r_lo, log_r_hi, out):
    for i in range(indices.shape[0]):
        key = sample_key(epoch_key, np.uint64(indices[i]))
        top, left, h, w = crop_box(key, height, width, scale_lo, scale_hi, log_r_lo, log_r_hi)
        out[i, 0], out[i, 1], out[i, 2], out[i, 3] = top, left, h, w
        out[i, 4] = 1 if flip_bit(key) else 0


def sample_crops(
    seed: int,
    epoch: int,
    indices: np.ndarray,
    height: int,
    width: int,
    scale: tuple[float, float] = (0.2, 1.0),
    ratio: tuple[float, float] = CROP_RATIO,
) -> np.ndarray:
    """:func:`sample_crop` of many samples in one compiled call: an ``(n, 5)`` int64 array of
    ``(top, left, h, w, flip)`` rows, equal to the per-sample results."""
    indices = np.ascontiguousarray(indices, dtype=np.int64)
    out = np.empty((indices.shape[0], 5), dtype=np.int64)
    _crops_of(np.uint64(crop_epoch_key(seed, epoch)), indices, np.int64(height), np.int64(width),
              float(scale[0]), float(scale[1]), float(np.log(ratio[0])), float(np.log(ratio[1])), out)
    return out


def stored_size(height: int, width: int, max_resolution: int | None) -> tuple[int, int]:
    """``(h, w)`` of an image after shrinking its longer side to ``max_resolution`` (never enlarged), with
    FFCV's rounding (``RGBImageField(max_resolution=...)``: sizes floored), so both loaders see the same
    dimensions and therefore draw the same boxes."""
    if not max_resolution or max(height, width) <= int(max_resolution):
        return int(height), int(width)
    ratio = int(max_resolution) / max(height, width)
    return max(1, int(ratio * height)), max(1, int(ratio * width))
