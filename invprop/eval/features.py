"""Embeddings of a split computed with the test transform (normalisation only), in batches streamed from
memory or, for image folders, from files (:func:`invprop.data.eval_batches`)."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from invprop.data import eval_batches, normalization
from invprop.progress import Tracker


@torch.no_grad()
def embed(model: torch.nn.Module, images, data_cfg, device: torch.device,
          batch_size: int = 512, pooled: bool = False, progress: Tracker | None = None) -> torch.Tensor:
    """L2-normalised embeddings (or pooled backbone features when `pooled`) of uint8 images (a tensor or
    lazy folder images); `progress` advances by the images done."""
    out = [(model.features(x) if pooled else model(x)).float()
           for x in _normalised_batches(model, images, data_cfg, device, batch_size, progress)]
    return torch.cat(out) if out else torch.empty(0)


@torch.no_grad()
def embed_and_pool(model: torch.nn.Module, images, data_cfg, device: torch.device,
                   batch_size: int = 512, progress: Tracker | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(head embeddings, pooled backbone features) from one backbone pass over the images (each decoded once);
    `progress` advances by the images done."""
    embeddings, features = [], []
    for x in _normalised_batches(model, images, data_cfg, device, batch_size, progress):
        pooled = model.features(x)
        embeddings.append(model.head(pooled).float())  # = model(x): the head on the same features
        features.append(pooled.float())
    if not embeddings:
        return torch.empty(0), torch.empty(0)
    return torch.cat(embeddings), torch.cat(features)


def _normalised_batches(model: torch.nn.Module, images, data_cfg, device: torch.device,
                        batch_size: int, progress: Tracker | None = None) -> Iterator[torch.Tensor]:
    """Test-transform batches on the device, the model in eval mode meanwhile (its mode restored after)."""
    mean, std = normalization(data_cfg)
    mean_t = torch.tensor(mean, device=device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, device=device).view(1, -1, 1, 1)
    was_training = model.training
    model.eval()
    try:
        for batch in eval_batches(images, batch_size):
            yield batch.to(device).float().div_(255).sub_(mean_t).div_(std_t)
            if progress is not None:  # back here once the caller has used the batch
                progress.advance(batch.shape[0])
    finally:
        model.train(was_training)
