"""Augmentations as pure functions of explicit random generators.

Two parts, so the expensive per-pixel work can run batched on the device:

- geometric, per sample on the CPU (loader workers): :func:`random_resized_crop` and :func:`random_hflip`,
  driven by a generator seeded from (seed, epoch, index), so a sample's crop never depends on batching,
  worker count or world size;
- colour, batched: :class:`BatchColorAugment` (ColorJitter with apply-probability and a random order of its
  four ops per sample, random grayscale, optional Gaussian blur, then normalisation), driven by one
  generator per call. Passing ``row_offset``/``rows_total`` draws the parameters for the whole *global*
  batch and uses this rank's rows, so the pixels do not depend on the world size either.

Nothing here touches torch's global RNG.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# ITU-R 601-2 luma weights, the usual RGB -> grey conversion (as PIL and torchvision use).
_LUMA = (0.299, 0.587, 0.114)


# --------------------------------------------------------------------------------------------------------
# Geometric part (per sample, uint8 CHW)
# --------------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------------
# Colour part (batched, float in [0, 1])
# --------------------------------------------------------------------------------------------------------


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


def _bcast(f: torch.Tensor) -> torch.Tensor:
    return f.view(-1, 1, 1, 1)


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (x * _bcast(factor)).clamp_(0.0, 1.0)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    mean = rgb_to_gray(x).mean(dim=(1, 2, 3), keepdim=True)
    f = _bcast(factor)
    return (f * x + (1.0 - f) * mean).clamp_(0.0, 1.0)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    f = _bcast(factor)
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


def eval_transform(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Evaluation transform: just normalisation (uint8 or [0, 1] float in, float32 out)."""
    return normalize(to_float01(x), mean, std)


class Normalize(nn.Module):
    """:func:`eval_transform` as a module with the same call signature as :class:`BatchColorAugment`."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None, **_: Any) -> torch.Tensor:
        return eval_transform(x, self.mean, self.std)


class BatchColorAugment(nn.Module):
    """Batched colour augmentation + normalisation on whatever device ``x`` lives on.

    ``forward(x, generator, row_offset=0, rows_total=None)``: ``x`` is ``(B, 3, H, W)`` uint8 or float in
    [0, 1]. All random parameters are drawn from ``generator`` (on its own device) for ``rows_total``
    samples (default B) in a fixed order, whatever the strengths, and rows
    ``row_offset .. row_offset + B`` are used.
    """

    def __init__(
        self,
        mean: Sequence[float],
        std: Sequence[float],
        *,
        brightness: float = 0.4,
        contrast: float = 0.4,
        saturation: float = 0.4,
        hue: float = 0.4,
        jitter_p: float = 1.0,
        grayscale_p: float = 0.2,
        blur_p: float = 0.0,
        blur_sigma: tuple[float, float] = (0.1, 2.0),
        blur_kernel_frac: float = 0.1,
    ) -> None:
        super().__init__()
        if not 0.0 <= hue <= 0.5:
            raise ValueError(f"hue must be in [0, 0.5], got {hue}")
        for name, v in (("brightness", brightness), ("contrast", contrast), ("saturation", saturation)):
            if v < 0:
                raise ValueError(f"{name} must be >= 0, got {v}")
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        # the same numbers as buffers, moved with .to(device) once instead of copied to the device every call
        self.register_buffer("mean_t", torch.tensor(self.mean), persistent=False)
        self.register_buffer("std_t", torch.tensor(self.std), persistent=False)
        self.brightness = float(brightness)
        self.contrast = float(contrast)
        self.saturation = float(saturation)
        self.hue = float(hue)
        self.jitter_p = float(jitter_p)
        self.grayscale_p = float(grayscale_p)
        self.blur_p = float(blur_p)
        self.blur_sigma = (float(blur_sigma[0]), float(blur_sigma[1]))
        self.blur_kernel_frac = float(blur_kernel_frac)
        self.select_rows: bool | None = None  # None: select each op's rows on the CPU, torch.where elsewhere

    @classmethod
    def from_config(
        cls, aug_cfg: Mapping[str, Any] | Any, mean: Sequence[float], std: Sequence[float]
    ) -> BatchColorAugment:
        """Build from an ``augment`` config node; unknown keys (``flip``, ``crop_scale``...) are ignored."""

        def get(key: str, default: Any) -> Any:
            v = aug_cfg.get(key, default) if aug_cfg is not None else default
            return default if v is None else v

        return cls(
            mean,
            std,
            brightness=float(get("brightness", 0.4)),
            contrast=float(get("contrast", 0.4)),
            saturation=float(get("saturation", 0.4)),
            hue=float(get("hue", 0.4)),
            jitter_p=float(get("jitter_p", 1.0)),
            grayscale_p=float(get("grayscale_p", 0.2)),
            blur_p=float(get("blur_p", 0.0)),
            blur_sigma=tuple(get("blur_sigma", (0.1, 2.0))),
            blur_kernel_frac=float(get("blur_kernel_frac", 0.1)),
        )

    def extra_repr(self) -> str:
        return (
            f"brightness={self.brightness}, contrast={self.contrast}, saturation={self.saturation}, "
            f"hue={self.hue}, jitter_p={self.jitter_p}, grayscale_p={self.grayscale_p}, "
            f"blur_p={self.blur_p}, blur_sigma={self.blur_sigma}"
        )

    def _jitter_selected(self, x: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """The four jitter ops in each sample's own random order, each op on the rows that take it next."""
        ops = [(0, adjust_brightness, params["brightness"], self.brightness),
               (1, adjust_contrast, params["contrast"], self.contrast),
               (2, adjust_saturation, params["saturation"], self.saturation), (3, adjust_hue, params["hue"], self.hue)]
        order, jitter = params["order"], params["jitter"]
        for step in range(4):
            for op_id, fn, p, strength in ops:
                if strength > 0:  # strength 0 is the identity
                    sel = (jitter & (order[:, step] == op_id)).nonzero().squeeze(1)
                    if sel.numel():
                        x[sel] = fn(x[sel], p[sel])
        return x

    def _jitter(self, x: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """The four jitter ops in each sample's own random order (ops of strength 0 are the identity).

        Brightness, contrast and saturation are all clamp(f x + (1 - f) t) (t = 0, the mean grey level, the
        grey image), so each of the four positions is one blend over the batch. Hue, the expensive one, runs
        once: the positions before each sample's hue step are applied first, then hue, then the rest.
        """
        order, jitter = params["order"], params["jitter"]
        # a strength of 0 draws factor 1.0 exactly, and f = 1 leaves a row bit for bit as it was: no op to skip
        factors = torch.stack([params["brightness"], params["contrast"], params["saturation"]], dim=1)
        if self.hue > 0:
            hue_at = (order == 3).to(torch.int64).argmax(dim=1)
            for step in range(3):  # positions before hue
                x = self._blend_step(x, order[:, step], jitter & (step < hue_at), factors)
            x = torch.where(_bcast(jitter), adjust_hue(x, params["hue"]), x)
            for step in range(1, 4):  # positions after hue
                x = self._blend_step(x, order[:, step], jitter & (step > hue_at), factors)
            return x
        for step in range(4):
            x = self._blend_step(x, order[:, step], jitter, factors)
        return x

    @staticmethod
    def _blend_step(x: torch.Tensor, op: torch.Tensor, active: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
        """Rows where `active` apply op 0 (brightness), 1 (contrast) or 2 (saturation); op 3 (hue) leaves its
        row as it is."""
        active = active & (op < 3)
        f = _bcast(factors.gather(1, op.clamp(max=2).unsqueeze(1)).squeeze(1))
        gray = rgb_to_gray(x)
        target = torch.where(_bcast(op == 1), gray.mean(dim=(1, 2, 3), keepdim=True), gray)
        rest = torch.where(_bcast(op == 0), torch.zeros_like(f), 1.0 - f)
        y = (f * x + rest * target).clamp_(0.0, 1.0)
        return torch.where(_bcast(active), y, x)

    def sample_params(self, n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Draw the parameters of ``n`` samples; the draw sequence does not depend on the strengths."""
        dev = generator.device

        def u(*shape: int) -> torch.Tensor:
            return torch.rand(*shape, generator=generator, device=dev)

        def factor(strength: float, v: torch.Tensor) -> torch.Tensor:
            lo = max(0.0, 1.0 - strength)
            return lo + (1.0 + strength - lo) * v

        return {
            "jitter": u(n) < self.jitter_p,
            "order": torch.argsort(u(n, 4), dim=1),  # random order of the four jitter ops, per sample
            "brightness": factor(self.brightness, u(n)),
            "contrast": factor(self.contrast, u(n)),
            "saturation": factor(self.saturation, u(n)),
            "hue": (2.0 * u(n) - 1.0) * self.hue,
            "gray": u(n) < self.grayscale_p,
            "blur": u(n) < self.blur_p,
            "sigma": self.blur_sigma[0] + (self.blur_sigma[1] - self.blur_sigma[0]) * u(n),
        }

    def forward(
        self,
        x: torch.Tensor,
        generator: torch.Generator,
        row_offset: int = 0,
        rows_total: int | None = None,
    ) -> torch.Tensor:
        bsz = x.shape[0]
        total = bsz if rows_total is None else int(rows_total)
        if row_offset < 0 or row_offset + bsz > total:
            raise ValueError(f"rows {row_offset}..{row_offset + bsz} outside the {total} drawn")
        params = {
            k: v[row_offset : row_offset + bsz].to(x.device) for k, v in self.sample_params(total, generator).items()
        }
        x = to_float01(x)

        # On an accelerator every op runs on the whole batch and rows pick their result with torch.where:
        # selecting each op's rows (nonzero + gather + scatter) costs a host sync per op, up to 18 per step.
        # On the CPU there is no queue to drain and selecting rows is 1.5-2.4x cheaper, so it selects.
        select_rows = x.device.type == "cpu" if self.select_rows is None else self.select_rows
        if self.jitter_p > 0 and max(self.brightness, self.contrast, self.saturation, self.hue) > 0:
            x = self._jitter_selected(x, params) if select_rows else self._jitter(x, params)
        k = max(3, int(round(self.blur_kernel_frac * x.shape[-1])) // 2 * 2 + 1)
        for key, p, fn in (("gray", self.grayscale_p, lambda v, _: rgb_to_gray(v).expand(-1, 3, -1, -1)),
                           ("blur", self.blur_p, lambda v, sigma: gaussian_blur(v, sigma, k))):
            if p <= 0:
                continue
            if select_rows:
                sel = params[key].nonzero().squeeze(1)
                if sel.numel():
                    x[sel] = fn(x[sel], params["sigma"][sel])
            else:
                x = torch.where(_bcast(params[key]), fn(x, params["sigma"]), x)
        return normalize(x, self.mean_t, self.std_t)
