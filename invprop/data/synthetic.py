"""Deterministic synthetic classification images for tests and smoke runs.

Each class has a smooth colour prototype; a sample is its class prototype, randomly shifted and rescaled in
contrast, plus pixel noise. Classes are therefore separable by nearest neighbours in pixel space (kNN well
above chance) while no two samples are identical. Sample i of a split is a pure function of
(seed, split, i): asking for more samples never changes the first ones.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from invprop.data.seeding import derive_seed

_SPLIT_IDS = {"train": 0, "test": 1}
_CHUNK = 1024  # samples generated per seeded chunk; bounds float memory for large N


def class_prototypes(num_classes: int, image_size: int, seed: int) -> torch.Tensor:
    """Float prototypes ``(C, 3, S, S)`` with values around 0, roughly in [-1.5, 1.5]."""
    g = torch.Generator().manual_seed(derive_seed(seed, 0xC1A55))
    coarse = torch.randn(num_classes, 3, 4, 4, generator=g)
    protos = F.interpolate(coarse, size=(image_size, image_size), mode="bicubic", align_corners=False)
    # A class-specific stripe pattern adds high-frequency structure that random crops keep.
    ys = torch.arange(image_size, dtype=torch.float32).view(1, -1, 1)
    xs = torch.arange(image_size, dtype=torch.float32).view(1, 1, -1)
    angle = torch.rand(num_classes, 1, 1, generator=g) * torch.pi
    freq = 0.3 + 0.5 * torch.rand(num_classes, 1, 1, generator=g)
    stripes = torch.sin(freq * (xs * torch.cos(angle) + ys * torch.sin(angle)))
    return 0.8 * protos + 0.6 * stripes.unsqueeze(1)


def make_synthetic(
    n: int,
    *,
    image_size: int = 32,
    num_classes: int = 10,
    seed: int = 0,
    split: str = "train",
    noise: float = 0.35,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(images uint8 (n, 3, S, S), labels int64 (n,))``; classes are balanced in every prefix."""
    if split not in _SPLIT_IDS:
        raise ValueError(f"unknown split {split!r}; expected 'train' or 'test'")
    if n < 0 or num_classes < 1 or image_size < 4:
        raise ValueError(f"bad synthetic sizes: n={n}, num_classes={num_classes}, image_size={image_size}")
    protos = class_prototypes(num_classes, image_size, seed)
    images = torch.empty(n, 3, image_size, image_size, dtype=torch.uint8)
    labels = torch.empty(n, dtype=torch.int64)
    for c0 in range(0, n, _CHUNK):
        c1 = min(n, c0 + _CHUNK)
        # Always draw a whole chunk and keep its head, so sample i never depends on n.
        m = _CHUNK
        g = torch.Generator().manual_seed(derive_seed(seed, _SPLIT_IDS[split], c0 // _CHUNK))
        # Labels: consecutive blocks of num_classes samples each hold every class once, in random order,
        # so any prefix is balanced (to one sample per block cut by a chunk boundary).
        lab = torch.argsort(torch.rand(m // num_classes + 1, num_classes, generator=g), dim=1).flatten()[:m]
        shift = torch.randint(-2, 3, (m, 2), generator=g)
        gain = 0.7 + 0.6 * torch.rand(m, 1, 1, 1, generator=g)
        offset = 0.3 * torch.randn(m, 3, 1, 1, generator=g)
        x = protos[lab]
        # Small integer translations keep each class's structure but vary the pixels; rolled per shift
        # value (25 groups) rather than per sample.
        for dy in range(-2, 3):
            for dx in range(-2, 3):
                sel = ((shift[:, 0] == dy) & (shift[:, 1] == dx)).nonzero().squeeze(1)
                if sel.numel():
                    x[sel] = torch.roll(x[sel], shifts=(dy, dx), dims=(2, 3))
        x = gain * x + offset + noise * torch.randn(m, 3, image_size, image_size, generator=g)
        images[c0:c1] = (128.0 + 50.0 * x[: c1 - c0]).round().clamp_(0, 255).to(torch.uint8)
        labels[c0:c1] = lab[: c1 - c0]
    return images, labels
