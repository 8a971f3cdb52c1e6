"""Per-sample geometry of uint8 ``(C, H, W)`` images in torch: resizing, and the linear probe's crops and flips.

:func:`resize_uint8` is the resize of the torchvision training path (the box itself comes from
:mod:`invprop.data.crop`, shared with FFCV) and of lazily decoded folders. :func:`geometric_augment` (crop, then
optional flip) is the linear probe's training augmentation, driven by a ``torch.Generator`` seeded per sample,
so a sample's crop never depends on batching, worker count or world size.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "geometric_augment",
    "random_hflip",
    "random_resized_crop",
    "random_resized_crop_params",
    "resize_uint8",
]


def _uniform(lo: float, hi: float, u: float) -> float:
    return lo + (hi - lo) * u


def random_resized_crop_params(
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    generator: torch.Generator,
) -> tuple[int, int, int, int]:
    """Sample ``(top, left, h, w)``: a crop of a ``scale`` fraction of the area, aspect ratio in ``ratio``.

    Up to 10 proposals; if none fits, a centre crop with the aspect ratio clamped into ``ratio``.
    """
    area = height * width
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    tries = torch.rand(10, 2, generator=generator).tolist()
    pos = torch.rand(2, generator=generator).tolist()  # drawn always: fixed generator consumption
    for u_area, u_ratio in tries:
        target = area * _uniform(scale[0], scale[1], u_area)
        aspect = math.exp(_uniform(log_r[0], log_r[1], u_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = min(int(pos[0] * (height - h + 1)), height - h)
            left = min(int(pos[1] * (width - w + 1)), width - w)
            return top, left, h, w
    aspect = width / height
    if aspect < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif aspect > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


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
