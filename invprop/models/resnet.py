"""Backbones returning pooled features (no classifier).

- ``resnet18_cifar``: ResNet-18 for small images (3x3 stride-1 stem, no max-pool), 512-d features. Module
  names follow torchvision (conv1, bn1, layer1..4) so weights map onto ``torchvision.models.resnet18`` with
  its stem swapped.
- ``resnet_tiny``: the same design, narrow (16-32-64-128, one block per stage, ~0.3M parameters), for CPU
  smoke runs and tests.
- ``resnet50``: ``torchvision.models.resnet50(weights=None)`` with ``fc`` replaced by identity, so its
  state_dict keys are torchvision's minus ``fc.*`` (exportable as is).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class BasicBlock(nn.Module):
    """Two 3x3 convolutions and a shortcut, laid out as torchvision's BasicBlock (same parameter names, created in
    the same order, so weights map one to one). Ours so that the small models load without torchvision, whose
    import costs a second of CPU in every process."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + shortcut)


class CifarResNet(nn.Module):
    """ResNet with BasicBlocks and a small-image stem; ``forward`` returns ``(B, widths[-1])`` features."""

    def __init__(self, widths: Sequence[int], blocks: Sequence[int], in_channels: int = 3) -> None:
        super().__init__()
        if len(widths) != 4 or len(blocks) != 4:
            raise ValueError("CifarResNet expects four stages")
        self.conv1 = nn.Conv2d(in_channels, widths[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        inplanes = widths[0]
        stages = []
        for i, (width, n_blocks) in enumerate(zip(widths, blocks, strict=True)):
            stride = 1 if i == 0 else 2
            stages.append(self._make_stage(inplanes, width, n_blocks, stride))
            inplanes = width
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = int(widths[-1])
        self._init_weights()

    @staticmethod
    def _make_stage(inplanes: int, planes: int, n_blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or inplanes != planes:
            downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )
        layers = [BasicBlock(inplanes, planes, stride=stride, downsample=downsample)]
        layers += [BasicBlock(planes, planes) for _ in range(n_blocks - 1)]
        return nn.Sequential(*layers)

    def _init_weights(self) -> None:
        # He init for convs, unit BN (the torchvision ResNet recipe), so all backbones start alike.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)


def resnet18_cifar() -> CifarResNet:
    return CifarResNet(widths=(64, 128, 256, 512), blocks=(2, 2, 2, 2))


def resnet_tiny() -> CifarResNet:
    return CifarResNet(widths=(16, 32, 64, 128), blocks=(1, 1, 1, 1))


def resnet50() -> nn.Module:
    """torchvision ResNet-50 (random init) whose ``fc`` is an identity: returns 2048-d pooled features."""
    import torchvision

    model = torchvision.models.resnet50(weights=None)
    model.feature_dim = int(model.fc.in_features)
    model.fc = nn.Identity()
    return model


BACKBONES = {
    "resnet_tiny": resnet_tiny,
    "resnet18_cifar": resnet18_cifar,
    "resnet50": resnet50,
}


def build_backbone(arch: str) -> tuple[nn.Module, int]:
    """``(backbone, feature_dim)`` for ``arch`` in :data:`BACKBONES`."""
    if arch not in BACKBONES:
        raise ValueError(f"unknown model.arch {arch!r}; expected one of {sorted(BACKBONES)}")
    backbone = BACKBONES[arch]()
    return backbone, int(backbone.feature_dim)
