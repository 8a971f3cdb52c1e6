"""``data.format=device``: the whole uint8 training set on the training device, batches cropped there.

For data sets that fit (Fashion-MNIST, CIFAR, SVHN, the synthetic set: tens of MB), a loader's per-sample work
(a Python call per image in worker processes, then a host-to-device copy) costs more than the step of a small
network. Here each batch is a gather from the resident images plus one batched bilinear crop-and-resize. The
boxes and flips are :func:`invprop.data.crop.sample_crop`'s, drawn for a whole batch in one compiled call, so a
sample is cropped where the other loaders crop it, in the same order (:class:`~invprop.data.order.EpochOrder`),
resumable at any batch.

The resize equals the torchvision path's (:func:`~invprop.data.geometric.resize_uint8`, antialiased bilinear)
where crops are enlarged or kept, which is every crop of an image no larger than the output: the condition for
this format. Both compute in float32, so a pixel could round to the neighbouring uint8 level (the tests find
them equal).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from invprop.data.crop import sample_crops
from invprop.data.order import EpochOrder


class DeviceBatches:
    """This rank's training batches ``(uint8 (B, C, S, S), labels, indices)``, all on ``images``' device."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, order: EpochOrder, *, seed: int, out_size: int,
                 crop_scale: tuple[float, float], flip: bool = False, device: torch.device | str = "cpu") -> None:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        if max(images.shape[-2:]) > out_size:
            raise ValueError(f"data.format=device crops images no larger than the {out_size}-px output; these are "
                             f"{images.shape[-2]}x{images.shape[-1]}: use data.format=ffcv or torchvision")
        if len(images) != order.n:
            raise ValueError(f"{len(images)} images but the order covers {order.n}")
        self.images = images.to(device)
        self.labels = labels.to(torch.int64).to(device)
        self.order = order
        self.seed, self.out_size, self.flip = int(seed), int(out_size), bool(flip)
        self.crop_scale = (float(crop_scale[0]), float(crop_scale[1]))

    def epoch(self, epoch: int, start_batch: int, rank: int, world: int) -> Iterator[tuple[torch.Tensor, ...]]:
        """Batches ``start_batch ..`` of ``epoch`` for ``rank`` of ``world``."""
        if not 0 <= start_batch <= self.order.num_batches:
            raise ValueError(f"start_batch {start_batch} outside [0, {self.order.num_batches}]")
        for b in range(start_batch, self.order.num_batches):
            indices = self.order.local_indices(epoch, b, rank, world)
            here = indices.to(self.images.device)
            boxes, flips = self.boxes(epoch, indices)
            crops = crop_resize(self.images[here], boxes.to(here.device), flips.to(here.device), self.out_size)
            yield crops, self.labels[here], indices

    def boxes(self, epoch: int, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B x 4 int64 top, left, h, w; B bool flips) of these samples in ``epoch``, on the host."""
        h, w = int(self.images.shape[-2]), int(self.images.shape[-1])
        drawn = torch.from_numpy(sample_crops(self.seed, epoch, indices.cpu().numpy(), h, w, self.crop_scale))
        return drawn[:, :4], (drawn[:, 4] == 1) & self.flip


def _taps(start: torch.Tensor, length: torch.Tensor, out: int) -> tuple[torch.Tensor, ...]:
    """Per sample and output position: the two source positions and the weight of the second, as
    F.interpolate(bilinear, align_corners=False) computes them for a crop of ``length`` from ``start``."""
    dst = torch.arange(out, dtype=torch.float32, device=start.device)
    src = ((dst + 0.5) * (length.unsqueeze(1).float() / out) - 0.5).clamp_(min=0)
    lo = src.floor().long()
    last = (length - 1).unsqueeze(1)
    lo = torch.minimum(lo, last)
    hi = torch.minimum(lo + 1, last)
    return start.unsqueeze(1) + lo, start.unsqueeze(1) + hi, src - lo


def crop_resize(images: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor, out: int) -> torch.Tensor:
    """uint8 (B, C, out, out): each image's box (top, left, h, w) resized bilinearly, flipped where asked."""
    n, c, height, width = images.shape
    y0, y1, wy = _taps(boxes[:, 0], boxes[:, 2], out)
    x0, x1, wx = _taps(boxes[:, 1], boxes[:, 3], out)
    x = images.float()

    def rows(at: torch.Tensor) -> torch.Tensor:
        return x.gather(2, at.view(n, 1, out, 1).expand(n, c, out, width))

    wy = wy.view(n, 1, out, 1)
    x = rows(y0) * (1 - wy) + rows(y1) * wy  # the weights' form of F.interpolate: same rounding

    def cols(at: torch.Tensor) -> torch.Tensor:
        return x.gather(3, at.view(n, 1, 1, out).expand(n, c, out, out))

    wx = wx.view(n, 1, 1, out)
    x = cols(x0) * (1 - wx) + cols(x1) * wx
    x = torch.where(flips.view(n, 1, 1, 1), x.flip(-1), x)
    return x.round_().clamp_(0, 255).to(torch.uint8)
