"""Embeddings of a split computed with the test transform (normalisation only), in batches streamed from
memory or, for image folders, from files (:func:`invprop.data.eval_batches`)."""

from __future__ import annotations

import torch

from invprop.data import eval_batches, normalization


@torch.no_grad()
def embed(model: torch.nn.Module, images, data_cfg, device: torch.device,
          batch_size: int = 512, pooled: bool = False) -> torch.Tensor:
    """L2-normalised embeddings (or pooled backbone features when `pooled`) of uint8 images (a tensor or
    lazy folder images)."""
    mean, std = normalization(data_cfg)
    mean_t = torch.tensor(mean, device=device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, device=device).view(1, -1, 1, 1)
    was_training = model.training
    model.eval()
    out = []
    for batch in eval_batches(images, batch_size):
        x = batch.to(device).float().div_(255).sub_(mean_t).div_(std_t)
        out.append((model.features(x) if pooled else model(x)).float())
    model.train(was_training)
    return torch.cat(out) if out else torch.empty(0)
