"""Per-sample geometry of uint8 ``(C, H, W)`` images in torch: resizing, and the linear probe's crops and flips.

:func:`resize_uint8` is the resize of the torchvision training path (the box itself comes from
:mod:`invprop.data.crop`, shared with FFCV) and of lazily decoded folders. :func:`geometric_augment` (crop, then
optional flip) is the linear probe's training augmentation, driven by a ``torch.Generator`` seeded per sample,
so a sample's crop never depends on batching, worker count or world size.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from invprop.data.crop import CROP_ATTEMPTS, U_AREA, U_ASPECT, U_LEFT, U_TOP, box_from_uniforms

__all__ = [
    "geometric_augment",
    "random_hflip",
    "random_resized_crop",
    "random_resized_crop_params",
    "resize_uint8",
]


def random_resized_crop_params(
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    generator: torch.Generator,
) -> tuple[int, int, int, int]:
    """Sample ``(top, left, h, w)``: a crop of a ``scale`` fraction of the area, aspect ratio in ``ratio``.

    Up to 10 proposals; if none fits, a centre crop with the aspect ratio clamped into ``ratio``. The box is
    :func:`~invprop.data.crop.box_from_uniforms` of ten (area, aspect) draws and one position pair shared by
    all proposals, drawn from ``generator`` in that order.
    """
    tries = torch.rand(CROP_ATTEMPTS, 2, generator=generator)
    pos = torch.rand(2, generator=generator)  # drawn always: fixed generator consumption
    draws = np.empty((CROP_ATTEMPTS, 4))
    draws[:, [U_AREA, U_ASPECT]] = tries.numpy()
    draws[:, [U_TOP, U_LEFT]] = pos.numpy()
    top, left, h, w = box_from_uniforms(
        np.int64(height), np.int64(width), float(scale[0]), float(scale[1]),
        math.log(ratio[0]), math.log(ratio[1]), float(ratio[0]), float(ratio[1]), draws,
    )
    return int(top), int(left), int(h), int(w)


def resize_uint8(img: torch.Tensor, out_size: int | tuple[int, int]) -> torch.Tensor:
    """Bilinear (antialiased) resize of a uint8 ``(C, H, W)`` image, rounded back to uint8."""
    size = (out_size, out_size) if isinstance(out_size, int) else tuple(out_size)
    if tuple(img.shape[-2:]) == size:
        return img.clone()
    x = F.interpolate(img.unsqueeze(0).float(), size=size, mode="bilinear", align_corners=False, antialias=True)
    return x.squeeze(0).round_().clamp_(0, 255).to(torch.uint8)


def random_resized_crop(
    img: torch.Tensor,
    out_size: int,
    scale: tuple[float, float] = (0.2, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """RandomResizedCrop of a uint8 ``(C, H, W)`` image to ``(C, out_size, out_size)``."""
    if generator is None:
        raise ValueError("random_resized_crop needs an explicit generator (determinism on resume)")
    _, h_img, w_img = img.shape
    top, left, h, w = random_resized_crop_params(h_img, w_img, tuple(scale), tuple(ratio), generator)
    return resize_uint8(img[:, top : top + h, left : left + w], out_size)


def random_hflip(img: torch.Tensor, generator: torch.Generator, p: float = 0.5) -> torch.Tensor:
    """Flip the last (width) axis with probability ``p``."""
    u = float(torch.rand(1, generator=generator))
    return img.flip(-1) if u < p else img


def geometric_augment(
    img: torch.Tensor,
    out_size: int,
    generator: torch.Generator,
    *,
    scale: tuple[float, float] = (0.2, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    flip: bool = False,
) -> torch.Tensor:
    """The per-sample CPU part of the training transform: crop, then optional flip."""
    out = random_resized_crop(img, out_size, scale, ratio, generator)
    return random_hflip(out, generator) if flip else out
