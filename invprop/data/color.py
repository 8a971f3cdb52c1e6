"""Batched colour operations on float ``(B, 3, H, W)`` images in [0, 1], any device, with per-sample strengths.

The building blocks of :class:`invprop.data.augment.BatchColorAugment`: ColorJitter's four adjustments,
grey conversion, Gaussian blur and normalisation. Pure functions: no random numbers are drawn here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "adjust_brightness",
    "adjust_contrast",
    "adjust_hue",
    "adjust_saturation",
    "gaussian_blur",
    "hsv_to_rgb",
    "normalize",
    "per_sample",
    "rgb_to_gray",
    "rgb_to_hsv",
    "to_float01",
]

# ITU-R 601-2 luma weights, the usual RGB -> grey conversion (as PIL and torchvision use).
_LUMA = (0.299, 0.587, 0.114)


def to_float01(x: torch.Tensor) -> torch.Tensor:
    """uint8 in [0, 255] -> float32 in [0, 1]; float input is copied (never modified in place)."""
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x.to(torch.float32, copy=True)


def rgb_to_gray(x: torch.Tensor) -> torch.Tensor:
    """``(B, 3, H, W)`` -> ``(B, 1, H, W)`` luma."""
    r, g, b = x.unbind(dim=1)
    return (_LUMA[0] * r + _LUMA[1] * g + _LUMA[2] * b).unsqueeze(1)


def rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    """Batched RGB -> HSV, all channels in [0, 1]; hue of grey pixels is 0."""
    r, g, b = x.unbind(dim=1)
    maxc, _ = x.max(dim=1)
    minc, _ = x.min(dim=1)
    delta = maxc - minc
    chroma = delta > 0
    sat = torch.where(maxc > 0, delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc)), torch.zeros_like(maxc))
    safe = torch.where(chroma, delta, torch.ones_like(delta))
    rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
    hue = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    hue = torch.where(chroma, torch.remainder(hue / 6.0, 1.0), torch.zeros_like(hue))
    return torch.stack((hue, sat, maxc), dim=1)


def hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    """Batched HSV -> RGB (inverse of :func:`rgb_to_hsv`).

    Closed form per channel n in (5, 3, 1) for (R, G, B): ``v - v*s*clamp(min(k, 4 - k), 0, 1)`` with
    ``k = (n + 6h) mod 6``; about twice as fast as selecting among six sector tables.
    """
    h, s, v = x.unbind(dim=1)
    h6 = torch.remainder(h, 1.0).mul(6.0).unsqueeze(1)
    n = torch.arange(5.0, 0.0, -2.0, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)  # 5, 3, 1; no host copy
    k = torch.remainder(n + h6, 6.0)
    w = torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)
    return v.unsqueeze(1) - (v * s).unsqueeze(1) * w


def per_sample(f: torch.Tensor) -> torch.Tensor:
    """A per-sample ``(B,)`` tensor shaped to broadcast over ``(B, C, H, W)``."""
    return f.view(-1, 1, 1, 1)


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (x * per_sample(factor)).clamp_(0.0, 1.0)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    mean = rgb_to_gray(x).mean(dim=(1, 2, 3), keepdim=True)
    f = per_sample(factor)
    return (f * x + (1.0 - f) * mean).clamp_(0.0, 1.0)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    f = per_sample(factor)
    return (f * x + (1.0 - f) * rgb_to_gray(x)).clamp_(0.0, 1.0)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate hue by ``shift`` (fraction of the colour circle, in [-0.5, 0.5]) per sample."""
    hsv = rgb_to_hsv(x)
    hue = torch.remainder(hsv[:, 0] + shift.view(-1, 1, 1), 1.0)
    return hsv_to_rgb(torch.stack((hue, hsv[:, 1], hsv[:, 2]), dim=1)).clamp_(0.0, 1.0)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Separable Gaussian blur with a per-sample ``sigma``; reflect padding."""
    bsz, ch, h, w = x.shape
    k = int(kernel_size)
    radius = k // 2
    t = torch.arange(k, device=x.device, dtype=x.dtype) - radius
    kern = torch.exp(-(t.view(1, -1) ** 2) / (2.0 * sigma.view(-1, 1).to(x.dtype) ** 2))
    kern = kern / kern.sum(dim=1, keepdim=True)  # (B, k)
    kern = kern.repeat_interleave(ch, dim=0)  # one filter per (sample, channel) group
    y = x.reshape(1, bsz * ch, h, w)
    # Reflect padding cannot reach further than the image itself; tiny images fall back to replicate.
    mode = "reflect" if radius < h and radius < w else "replicate"
    y = F.pad(y, (radius, radius, radius, radius), mode=mode)
    y = F.conv2d(y, kern.view(bsz * ch, 1, 1, k), groups=bsz * ch)
    y = F.conv2d(y, kern.view(bsz * ch, 1, k, 1), groups=bsz * ch)
    return y.view(bsz, ch, h, w)


def normalize(x: torch.Tensor, mean: Sequence[float] | torch.Tensor, std: Sequence[float] | torch.Tensor
              ) -> torch.Tensor:
    """(x - mean) / std per channel. Pass tensors already on x's device in a loop: making them from Python
    numbers is a blocking host-to-device copy on a GPU."""
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s
