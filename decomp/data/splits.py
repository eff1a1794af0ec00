"""Seeded, stratified splits of a labelled data set: the validation hold-out and subsets."""

from __future__ import annotations

import numpy as np
import torch


def _split_count(val_split: float | int, total: int) -> int:
    """Validation size from a fraction in (0, 1) or a count in [1, total - 1]."""
    if isinstance(val_split, float) and not 0 < val_split < 1:
        raise ValueError(f"val_split must be a fraction in (0, 1) or a count; got {val_split}")
    count = round(val_split * total) if isinstance(val_split, float) else int(val_split)
    if not 1 <= count < total:
        raise ValueError(
            f"val_split={val_split} gives {count} of {total} items; need 1..{total - 1}"
        )
    return count


def stratified_split(
    labels: torch.Tensor | np.ndarray, val_split: float | int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into train and validation, per class in proportion, reproducibly.

    Each class gives ``val_split`` of its items (largest remainders settle the rounding, so the
    validation set has exactly the requested size); which items is decided by ``seed``.

    Args:
        labels: Class index per item, shape ``(N,)``.
        val_split: A fraction in (0, 1), or a count in [1, N - 1].
        seed: Seed of the permutation.

    Returns:
        ``(train_idx, val_idx)``: disjoint sorted int64 arrays covering ``range(N)``.
    """
    labels = np.asarray(labels)
    count = _split_count(val_split, len(labels))
    classes, sizes = np.unique(labels, return_counts=True)
    quota = sizes * count / len(labels)
    take = np.floor(quota).astype(np.int64)
    extra = np.argsort(-(quota - take), kind="stable")[: count - int(take.sum())]
    take[extra] += 1
    rng = np.random.default_rng(seed)
    val = [
        rng.permutation(np.flatnonzero(labels == c))[:k] for c, k in zip(classes, take, strict=True)
    ]
    val_idx = np.sort(np.concatenate(val)).astype(np.int64)
    train_idx = np.setdiff1d(np.arange(len(labels)), val_idx).astype(np.int64)
    return train_idx, val_idx


def stratified_subset(
    indices: np.ndarray, labels: torch.Tensor, size: int | None, seed: int
) -> np.ndarray:
    """At most ``size`` of ``indices``, chosen stratified by label and seeded."""
    if size is None or size >= len(indices):
        return indices
    if size < 1:
        raise ValueError(f"train_subset must be >= 1; got {size}")
    _, keep = stratified_split(labels[indices].numpy(), size, seed + 1)
    return indices[keep]
