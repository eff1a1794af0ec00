"""Shared test helpers: a tiny residual conv net importable as ``tests.conftest:tiny_net``.

The repository root goes on sys.path so that ``--arch tests.conftest:tiny_net`` resolves however
pytest was started.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
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


DIGIT_CLASSES = 4


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    """scikit-learn's 8x8 digits 0-3 as an ImageFolder with train/, val/ and test/ splits."""
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("digits")
    x, y = load_digits(n_class=DIGIT_CLASSES, return_X_y=True)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(y))
    splits = {"train": order[:160], "val": order[160:200], "test": order[200:240]}
    for split, idx in splits.items():
        for i in idx:
            folder = root / split / str(y[i])
            folder.mkdir(parents=True, exist_ok=True)
            pixels = (x[i].reshape(8, 8) * (255 / 16)).astype(np.uint8)
            Image.fromarray(pixels, mode="L").save(folder / f"{i}.png")
    return root


@pytest.fixture
def one_thread():
    """One intra-op thread: on a busy 2-core machine two threads spin against each other and
    make these tiny convolutions 30x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
