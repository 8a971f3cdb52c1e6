"""What the linear probe and semisup share (docs/DESIGN.md, "Evaluation protocols"): seeded random resized
crops, pooled backbone features, top-k accuracy. The probe itself runs over an evaluation world
(invprop/eval/linear_world.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from invprop.data import geometric_augment, is_lazy
from invprop.data.seeding import derive_seed
from invprop.eval.features import embed
from invprop.progress import Tracker


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Run per-sample CPU image ops on one intra-op thread: for 32px crops, thread start-up costs about
    ten times the work itself."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def crop_batch(images: torch.Tensor, indices: list[int], seeds: list[int], crop_scale: tuple[float, float],
               flip: bool) -> torch.Tensor:
    """Random resized crops (the evaluation size) of ``images[indices]``, sample j from ``seeds[j]``; for
    folder images the crop is taken from the decoded file."""
    size = int(images.image_size if is_lazy(images) else images.shape[-1])
    with single_thread():
        return torch.stack([geometric_augment(images[i], size, torch.Generator().manual_seed(s), scale=crop_scale,
                                              flip=flip) for i, s in zip(indices, seeds, strict=True)])


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> list[float]:
    """Fraction (0..1) of rows whose label is among the k highest logits, for each k (k capped at C)."""
    labels = labels.to(logits.device)
    kmax = min(max(ks), logits.shape[1])
    top = logits.topk(kmax, dim=1).indices
    hit = top == labels.view(-1, 1)
    return [hit[:, : min(k, kmax)].any(dim=1).float().mean().item() for k in ks]


@torch.no_grad()
def pooled_features(model: nn.Module, images: torch.Tensor, data_cfg: Any, device: torch.device,
                    batch_size: int = 512, *, view: int | None = None, seed: int = 0,
                    crop_scale: tuple[float, float] = (0.2, 1.0), flip: bool = False,
                    offset: int = 0, progress: Tracker | None = None) -> torch.Tensor:
    """Pooled backbone features of uint8 images with the test transform (``view=None``), or of random
    resized crops: view ``v`` of image ``i`` is cropped with a generator seeded from (seed, v, i), where ``i``
    counts from ``offset`` (a rank's shard: its first row's index in the split). ``progress`` advances by the
    images done."""
    if view is None:
        return embed(model, images, data_cfg, device, batch_size, pooled=True, progress=progress)
    out = []
    for lo in range(0, len(images), batch_size):
        idx = list(range(lo, min(lo + batch_size, len(images))))
        crops = crop_batch(images, idx, [derive_seed(seed, 0x11FEA7, view, offset + i) for i in idx], crop_scale,
                           flip)
        out.append(embed(model, crops, data_cfg, device, batch_size, pooled=True, progress=progress))
    return torch.cat(out)


@torch.no_grad()
def predict(head: nn.Module, feats: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    was_training = head.training
    head.eval()
    out = torch.cat([head(feats[lo : lo + chunk]) for lo in range(0, feats.shape[0], chunk)])
    head.train(was_training)
    return out
