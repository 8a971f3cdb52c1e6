"""Backbones and projection heads. A leaf: imports nothing else of invprop.

``model_cfg`` keys: ``arch`` (resnet_tiny | resnet18_cifar | resnet50), ``head`` (linear | mlp),
``embedding_dim`` (128), ``hidden_dim`` (null -> the backbone's feature dim).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from invprop.models.heads import LinearHead, MLPHead, build_head
from invprop.models.resnet import BACKBONES, CifarResNet, build_backbone, resnet18_cifar, resnet50, resnet_tiny

if TYPE_CHECKING:  # the schema's type only: nothing of invprop is imported at run time
    from invprop.config.schema import ModelConfig


class EmbeddingModel(nn.Module):
    """Backbone + head. ``forward`` gives the L2-normalised embedding, ``features`` the pooled features."""

    def __init__(self, backbone: nn.Module, head: nn.Module, feature_dim: int, embedding_dim: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.feature_dim = int(feature_dim)
        self.embedding_dim = int(embedding_dim)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, feature_dim)`` pooled backbone features (for kNN on features and linear probes)."""
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def build_model(model_cfg: ModelConfig) -> EmbeddingModel:
    """Build an :class:`EmbeddingModel` from the ``model`` config section."""
    backbone, feature_dim = build_backbone(str(model_cfg.arch))
    hidden = model_cfg.hidden_dim
    head = build_head(str(model_cfg.head), feature_dim, int(model_cfg.embedding_dim),
                      int(hidden) if hidden else None)
    return EmbeddingModel(backbone, head, feature_dim, int(model_cfg.embedding_dim))


__all__ = [
    "BACKBONES",
    "CifarResNet",
    "EmbeddingModel",
    "LinearHead",
    "MLPHead",
    "build_backbone",
    "build_head",
    "build_model",
    "resnet18_cifar",
    "resnet50",
    "resnet_tiny",
]
