"""Projection heads: backbone features -> L2-normalised embedding (the vectors stored in the memory bank)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LinearHead(nn.Module):
    """``in_dim -> out_dim`` linear map, then L2 normalisation (NPID / InvP default, tau 0.07)."""

    def __init__(self, in_dim: int, out_dim: int = 128) -> None:
        super().__init__()
        self.fc = nn.Linear(in_dim, out_dim)
        self.out_dim = out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.fc(x), dim=1)


class MLPHead(nn.Module):
    """``in_dim -> hidden_dim -> ReLU -> out_dim``, then L2 normalisation (e.g. 512-512-128, tau 0.2)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int = 128) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(hidden_dim, out_dim)
        self.out_dim = out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.fc2(self.relu(self.fc1(x))), dim=1)


def build_head(kind: str, in_dim: int, out_dim: int = 128, hidden_dim: int | None = None) -> nn.Module:
    """``kind`` is ``linear`` or ``mlp``; ``hidden_dim`` defaults to ``in_dim``."""
    if kind == "linear":
        return LinearHead(in_dim, out_dim)
    if kind == "mlp":
        return MLPHead(in_dim, hidden_dim or in_dim, out_dim)
    raise ValueError(f"unknown model.head {kind!r}; expected 'linear' or 'mlp'")
