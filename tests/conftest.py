"""Shared test helpers: a tiny residual conv net importable as ``tests.conftest:tiny_net``.

The repository root goes on sys.path so that ``--arch tests.conftest:tiny_net`` resolves however
pytest was started.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.append(str(REPO))


class TinyNet(nn.Module):
    """conv-BN-ReLU stem, one residual block of two 3x3 convs, a strided 1x1, pool, linear."""

    def __init__(self, in_channels: int = 3, width: int = 16, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
        )
        self.conv1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.down = nn.Conv2d(width, 2 * width, 1, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.relu(x + self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return self.fc(self.pool(self.down(x)).flatten(1))


def tiny_net(in_channels: int = 3, width: int = 16, num_classes: int = 10) -> TinyNet:
    """A seeded :class:`TinyNet` (the same weights on every call)."""
    torch.manual_seed(0)
    return TinyNet(in_channels, width, num_classes)
