"""Training-time colour augmentation and the evaluation transform, batched on the device.

:class:`BatchColorAugment` (ColorJitter with apply-probability and a random order of its four ops per sample,
random grayscale, optional Gaussian blur, then normalisation) is driven by one generator per call. Passing
``row_offset``/``rows_total`` draws the parameters for the whole *global* batch and uses this rank's rows, so
the pixels do not depend on the world size. The per-sample geometric part runs earlier, in the loaders
(:mod:`invprop.data.crop`, :mod:`invprop.data.geometric`); the pixel operations are :mod:`invprop.data.color`.

Nothing here touches torch's global RNG.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from invprop.config.data_schema import AugmentConfig

from invprop.data.color import (
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    gaussian_blur,
    normalize,
    per_sample,
    rgb_to_gray,
    to_float01,
)

__all__ = ["BatchColorAugment", "Normalize", "eval_transform"]


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
        cls, aug_cfg: AugmentConfig, mean: Sequence[float], std: Sequence[float]
    ) -> BatchColorAugment:
        """Build from the ``data.augment`` section (its crop and flip keys belong to the loaders)."""
        return cls(mean, std, brightness=float(aug_cfg.brightness), contrast=float(aug_cfg.contrast),
                   saturation=float(aug_cfg.saturation), hue=float(aug_cfg.hue), jitter_p=float(aug_cfg.jitter_p),
                   grayscale_p=float(aug_cfg.grayscale_p), blur_p=float(aug_cfg.blur_p))

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
            x = torch.where(per_sample(jitter), adjust_hue(x, params["hue"]), x)
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
        f = per_sample(factors.gather(1, op.clamp(max=2).unsqueeze(1)).squeeze(1))
        gray = rgb_to_gray(x)
        target = torch.where(per_sample(op == 1), gray.mean(dim=(1, 2, 3), keepdim=True), gray)
        rest = torch.where(per_sample(op == 0), torch.zeros_like(f), 1.0 - f)
        y = (f * x + rest * target).clamp_(0.0, 1.0)
        return torch.where(per_sample(active), y, x)

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
                x = torch.where(per_sample(params[key]), fn(x, params["sigma"]), x)
        return normalize(x, self.mean_t, self.std_t)
