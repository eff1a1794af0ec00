"""decomp.data.fashion_mnist and load_data on it: IDX files, splits, shapes, loaders, samplers."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import SequentialSampler

from decomp.data import Preprocessing, calibration_data, load_data
from decomp.data.fashion_mnist import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DIR,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    read_fashion_mnist,
    read_idx,
)


def idx_bytes(array: np.ndarray) -> bytes:
    """Encode a uint8 array as an IDX file."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx(path: Path, array: np.ndarray) -> Path:
    """Write an IDX file, gzipped when the name ends in .gz."""
    data = idx_bytes(array)
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


def make_fashion(folder: Path, n_train: int = 40, n_test: int = 20, gz: bool = True) -> dict:
    """Write a tiny Fashion-MNIST (balanced labels, random pixels) into ``folder``."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    ext = ".gz" if gz else ""
    arrays = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        write_idx(folder / f"{split}-images-idx3-ubyte{ext}", images)
        write_idx(folder / f"{split}-labels-idx1-ubyte{ext}", labels)
        arrays[split] = (images, labels)
    return arrays


@pytest.fixture
def fashion_dir(tmp_path: Path) -> tuple[Path, dict]:
    folder = tmp_path / "fmnist"
    return folder, make_fashion(folder)


def test_read_idx_round_trip_gz_and_plain(tmp_path):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    for name in ("a.gz", "a"):
        assert np.array_equal(read_idx(write_idx(tmp_path / name, array)), array)


def test_read_idx_truncated_names_the_file(tmp_path):
    path = tmp_path / "short-idx3-ubyte"
    path.write_bytes(idx_bytes(np.zeros((5, 4, 4), np.uint8))[:-3])
    with pytest.raises(ValueError, match="short-idx3-ubyte.*truncated"):
        read_idx(path)


def test_read_idx_bad_magic_names_the_file(tmp_path):
    path = tmp_path / "bad.gz"
    path.write_bytes(gzip.compress(b"\x01\x02\x08\x01" + b"\x00" * 8))
    with pytest.raises(ValueError, match="bad.gz.*magic"):
        read_idx(path)


def test_read_idx_truncated_gzip_names_the_file(tmp_path):
    path = tmp_path / "cut.gz"
    path.write_bytes(gzip.compress(idx_bytes(np.zeros((50, 28, 28), np.uint8)))[:40])
    with pytest.raises(ValueError, match="cut.gz"):
        read_idx(path)


def test_read_fashion_mnist_reads_plain_files(tmp_path):
    arrays = make_fashion(tmp_path, gz=False)
    images, labels = read_fashion_mnist(tmp_path, "test")
    assert images.dtype == torch.uint8 and images.shape == (20, 28, 28)
    assert np.array_equal(images.numpy(), arrays["t10k"][0])
    assert labels.dtype == torch.int64 and labels.tolist() == arrays["t10k"][1].tolist()


def test_missing_fashion_folder_says_how_to_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        load_data(f"fashion-mnist:{tmp_path / 'nowhere'}", workers=0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        load_data(f"fashion-mnist:{tmp_path / 'empty'}", workers=0)


def test_fashion_bundle_splits_and_shapes(fashion_dir):
    folder, _ = fashion_dir
    bundle = load_data(
        f"fashion-mnist:{folder}", (3, 32, 32), batch_size=8, val_split=10, workers=0
    )
    assert bundle.class_names == list(FASHION_MNIST_CLASSES) and bundle.num_classes == 10
    assert bundle.input_size == (3, 32, 32)
    sizes = [len(bundle.train_loader.dataset), len(bundle.val_loader.dataset)]
    assert sizes == [30, 10] and len(bundle.test_loader.dataset) == 20
    x, y = next(iter(bundle.train_loader))
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 0], x[:, 2])  # grey replicated
    assert sorted(bundle.val_loader.dataset.targets.tolist()) == list(range(10))  # stratified
    assert sum(len(b[1]) for b in bundle.train_loader) == 30  # drop_last=False


def test_fashion_eval_items_are_padded_and_normalized(fashion_dir):
    folder, arrays = fashion_dir
    bundle = load_data(f"fashion-mnist:{folder}", (1, 32, 32), val_split=10, workers=0)
    x, _ = bundle.test_loader.dataset[3]
    zero = -FASHION_MNIST_MEAN[0] / FASHION_MNIST_STD[0]
    raw = torch.from_numpy(arrays["t10k"][0][3]).float() / 255
    assert x.shape == (1, 32, 32)
    assert torch.allclose(x[0, 2:30, 2:30], (raw - FASHION_MNIST_MEAN[0]) / FASHION_MNIST_STD[0])
    assert torch.allclose(x[0, :2], torch.full((2, 32), zero))
    assert torch.allclose(x[0, :, 30:], torch.full((32, 2), zero))
    assert torch.equal(bundle.test_loader.dataset.__getitems__([3])[0][0], x)


def test_fashion_keeps_its_statistics_unless_told_and_calibrates_on_train(fashion_dir):
    folder, arrays = fashion_dir
    spec = f"fashion-mnist:{folder}"
    own = load_data(spec, (3, 32, 32), val_split=10, workers=0)
    assert own.mean == FASHION_MNIST_MEAN * 3 and own.preprocessing.std == FASHION_MNIST_STD * 3
    unit = Preprocessing(mean=(0.0,), std=(1.0,))
    data = calibration_data(spec, (1, 28, 28), unit, batch_size=16, workers=0)
    assert data.images == 40 and len(data.loader) == 3 and data.preprocessing.mean == (0.0,)
    x = torch.cat([b[0] for b in data.loader])
    raw = torch.from_numpy(arrays["train"][0]).float()[:, None] / 255
    assert not torch.equal(x, raw) and torch.equal(x.sort(0).values, raw.sort(0).values)


def test_fashion_smaller_input_is_resized(fashion_dir):
    folder, _ = fashion_dir
    bundle = load_data(f"fashion-mnist:{folder}", (3, 16, 16), val_split=0.25, workers=0)
    x, _ = next(iter(bundle.val_loader))
    assert x.shape == (10, 3, 16, 16)


def test_fashion_train_subset_and_seed(fashion_dir):
    folder, _ = fashion_dir
    spec = f"fashion-mnist:{folder}"
    a = load_data(spec, val_split=10, train_subset=12, seed=3, workers=0)
    b = load_data(spec, val_split=10, train_subset=12, seed=3, workers=0)
    assert len(a.train_loader.dataset) == 12
    assert torch.equal(a.train_loader.dataset.images, b.train_loader.dataset.images)
    batches_a = [y.tolist() for _, y in a.train_loader]
    assert batches_a == [y.tolist() for _, y in b.train_loader]  # seeded shuffle


def test_fashion_loader_with_worker_processes(fashion_dir):
    folder, _ = fashion_dir
    bundle = load_data(f"fashion-mnist:{folder}", val_split=10, batch_size=16, workers=2)
    assert bundle.train_loader.persistent_workers
    shapes = [tuple(x.shape) for x, _ in bundle.train_loader]
    assert shapes == [(16, 3, 32, 32), (14, 3, 32, 32)]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")
def test_sampler_hook_and_distributed_sampler(fashion_dir, tmp_path):
    folder, _ = fashion_dir
    spec = f"fashion-mnist:{folder}"
    probe = load_data(spec, val_split=10, workers=0)
    sampler = SequentialSampler(probe.train_loader.dataset)
    bundle = load_data(spec, val_split=10, workers=0, sampler=sampler)
    assert bundle.train_loader.sampler is sampler and bundle.train_sampler is sampler
    dist = torch.distributed
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        bundle = load_data(spec, val_split=10, workers=0)
    finally:
        dist.destroy_process_group()
    assert type(bundle.train_sampler).__name__ == "DistributedSampler"
    assert bundle.train_loader.sampler is bundle.train_sampler
    assert load_data(spec, val_split=10, workers=0).train_sampler is None


@pytest.mark.skipif(not FASHION_MNIST_DIR.is_dir(), reason="dataset-fashion-mnist not installed")
def test_real_fashion_mnist_test_set():
    bundle = load_data("fashion-mnist", (3, 32, 32), batch_size=256, workers=0)
    assert len(bundle.test_loader.dataset) == 10_000 and bundle.num_classes == 10
    assert len(bundle.train_loader.dataset) == 55_000 and len(bundle.val_loader.dataset) == 5_000
    assert torch.bincount(bundle.test_loader.dataset.targets).tolist() == [1000] * 10
    x, _ = next(iter(bundle.test_loader))
    assert x.shape == (256, 3, 32, 32)
