"""The tiny training task the train, batch-norm and DDP tests share.

1x8x8 noise images whose label is the quadrant holding a brighter patch, a two-conv network with
batch norm, loaders, a reference evaluation independent of decomp, and state comparisons.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from sklearn.metrics import f1_score
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from decomp.train import TrainConfig, TrainResult, train

CLASSES = 4


def make_data(n: int, seed: int) -> TensorDataset:
    """1x8x8 noise images; the label is the quadrant that holds a brighter 4x4 patch."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 1, 8, 8, generator=gen)
    labels = torch.randint(0, CLASSES, (n,), generator=gen)
    for i, label in enumerate(labels.tolist()):
        row, col = 4 * (label // 2), 4 * (label % 2)
        images[i, 0, row : row + 4, col : col + 4] += 0.8
    return TensorDataset(images, labels)


class TinyNet(nn.Module):
    """conv-BN-ReLU x2, 2x2 average pool, optional dropout, linear."""

    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(64, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(self.drop(self.pool(x).flatten(1)))


def loaders(seed: int = 0, batch_size: int = 32) -> tuple[DataLoader, DataLoader]:
    train_loader = DataLoader(
        make_data(256, seed=0),
        batch_size=batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
    )
    return train_loader, DataLoader(make_data(128, seed=1), batch_size=64)


def net(seed: int = 0, dropout: float = 0.0) -> TinyNet:
    torch.manual_seed(seed)
    return TinyNet(dropout)


def evaluate(model: nn.Module, loader: DataLoader) -> dict[str, float]:
    """Reference evaluation, independent of decomp.train: macro F1 (sklearn) and accuracy."""
    model.eval()
    with torch.no_grad():
        pairs = [(model(x).argmax(1), y) for x, y in loader]
    preds = torch.cat([p for p, _ in pairs])
    labels = torch.cat([y for _, y in pairs])
    f1 = f1_score(labels, preds, average="macro", labels=list(range(CLASSES)), zero_division=0)
    return {"f1": float(f1), "accuracy": float((preds == labels).float().mean())}


def states_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def fit(model: nn.Module, epochs: int = 4, **kwargs) -> TrainResult:
    train_loader, val_loader = loaders()
    config = TrainConfig(epochs=epochs, lr=0.05, schedule="onecycle", **kwargs)
    return train(model, train_loader, val_loader, config, progress=False)
