"""decomp.data.splits: stratified, seeded, exact-size hold-outs."""

from __future__ import annotations

import numpy as np
import pytest

from decomp.data.splits import stratified_split


def test_stratified_split_exact_size_per_class_and_seeded():
    labels = np.repeat(np.arange(3), [10, 20, 30])
    train, val = stratified_split(labels, 0.1, seed=5)
    assert len(val) == 6 and np.bincount(labels[val]).tolist() == [1, 2, 3]
    assert len(np.intersect1d(train, val)) == 0 and len(train) + len(val) == 60
    assert np.array_equal(stratified_split(labels, 0.1, seed=5)[1], val)
    assert len(stratified_split(labels, 7, seed=5)[1]) == 7
    for bad in (0.0, 1.0, 0, 60):
        with pytest.raises(ValueError, match="val_split"):
            stratified_split(labels, bad)
