"""Tests for decomp.data: IDX parsing, Fashion-MNIST, ImageFolder layouts, transforms, loaders."""

from __future__ import annotations

import gzip
import logging
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import SequentialSampler

from decomp.data import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DIR,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    fit_images,
    load_data,
    random_hflip,
    random_shift,
    read_fashion_mnist,
    read_idx,
    scan_image_folder,
    stratified_split,
)

# --------------------------------------------------------------------------- IDX helpers


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


# --------------------------------------------------------------------------- IDX and Fashion-MNIST


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


# --------------------------------------------------------------------------- batch transforms


def test_random_hflip_extremes_and_mix():
    images = torch.arange(2 * 1 * 2 * 3, dtype=torch.uint8).reshape(2, 1, 2, 3)
    assert torch.equal(random_hflip(images, p=1.0), images.flip(-1))
    assert torch.equal(random_hflip(images, p=0.0), images)
    torch.manual_seed(0)
    many = torch.arange(64, dtype=torch.uint8).view(64, 1, 1, 1).expand(64, 1, 1, 2).clone()
    many[..., 1] = 255
    flipped = random_hflip(many)[..., 0] == 255
    assert 10 < int(flipped.sum()) < 54  # each image decides for itself


def test_random_shift_is_a_per_image_translation():
    torch.manual_seed(0)
    images = torch.randint(1, 256, (32, 1, 8, 8), dtype=torch.uint8)
    assert torch.equal(random_shift(images, 0), images)
    shifted = random_shift(images, 2)
    assert shifted.shape == images.shape
    offsets = set()
    for src, out in zip(images, shifted, strict=True):
        padded = torch.nn.functional.pad(src, (2, 2, 2, 2))
        matches = [
            (dy, dx)
            for dy in range(5)
            for dx in range(5)
            if torch.equal(padded[:, dy : dy + 8, dx : dx + 8], out)
        ]
        assert len(matches) == 1
        offsets.add(matches[0])
    assert len(offsets) > 5


def test_fit_images_pads_or_resizes():
    images = torch.full((2, 1, 28, 28), 7, dtype=torch.uint8)
    padded = fit_images(images, (32, 30))
    assert padded.shape == (2, 1, 32, 30) and int(padded.sum()) == 2 * 28 * 28 * 7
    assert fit_images(images, (14, 14)).shape == (2, 1, 14, 14)


# --------------------------------------------------------------------------- ImageFolder

SIZES = [(10, 20), (64, 48), (33, 17)]
MODES = ["L", "RGB", "RGBA", "P"]


def make_image(path: Path, size: tuple[int, int], mode: str, seed: int) -> None:
    """Write a random image of ``size`` (w, h) in ``mode`` to ``path`` (format from suffix)."""
    rng = np.random.default_rng(seed)
    rgb = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    if mode == "P":
        image = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    else:
        image = rgb.convert(mode)
    if path.suffix == ".jpg" and mode in ("RGBA", "P"):
        image = image.convert("RGB")
    image.save(path)


def make_folder(root: Path, per_class: int = 6, classes=("bag", "can", "cup"), seed=0) -> int:
    """Class folders of mixed sizes, modes and formats; returns the number of images written."""
    count = 0
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            k = seed + 100 * c + i
            suffix = ".png" if i % 2 else ".jpg"
            make_image(root / name / f"img{i}{suffix}", SIZES[k % 3], MODES[k % 4], k)
            count += 1
    return count


def corrupt(path: Path) -> Path:
    path.write_bytes(np.random.default_rng(1).integers(0, 256, 300, dtype=np.uint8).tobytes())
    return path


@pytest.mark.parametrize("channels", [1, 3])
def test_image_folder_mixed_images_and_a_corrupt_one(tmp_path, caplog, channels):
    total = make_folder(tmp_path)
    bad = corrupt(tmp_path / "can" / "broken.jpg")
    (tmp_path / "can" / "notes.txt").write_text("not an image")
    with caplog.at_level(logging.WARNING, logger="decomp.data"):
        bundle = load_data(
            str(tmp_path), (channels, 24, 20), batch_size=4, val_split=0.25, workers=0
        )
    assert bundle.skipped == 1 and bundle.skipped_files == [str(bad)]
    assert bundle.train_loader.dataset.skipped == 1
    assert any(str(bad) in record.getMessage() for record in caplog.records)
    assert bundle.class_names == ["bag", "can", "cup"] and bundle.test_loader is None
    n_train, n_val = len(bundle.train_loader.dataset), len(bundle.val_loader.dataset)
    assert (n_train, n_val) == (total - 4, 4)  # round(0.25 * 18) = 4
    for loader in (bundle.train_loader, bundle.val_loader):
        for x, y in loader:
            assert x.shape[1:] == (channels, 24, 20) and x.dtype == torch.float32
            assert x.shape[0] == y.shape[0] <= 4 and torch.isfinite(x).all()


def test_image_folder_train_val_test_layout(tmp_path):
    n_train = make_folder(tmp_path / "train", per_class=4)
    n_val = make_folder(tmp_path / "val", per_class=2, seed=7)
    make_folder(tmp_path / "test", per_class=1, seed=9)
    bundle = load_data(str(tmp_path), (3, 16, 16), batch_size=5, workers=0)
    assert len(bundle.train_loader.dataset) == n_train and len(bundle.val_loader.dataset) == n_val
    assert len(bundle.test_loader.dataset) == 3 and bundle.num_classes == 3
    paths = [p for p, _ in bundle.val_loader.dataset.samples]
    assert all("/val/" in p for p in paths)
    x, y = next(iter(bundle.val_loader))
    assert x.shape == (5, 3, 16, 16) and y.tolist() == [0, 0, 1, 1, 2]


def test_image_folder_val_with_unknown_class_is_rejected(tmp_path):
    make_folder(tmp_path / "train", per_class=2)
    make_folder(tmp_path / "val", per_class=1, classes=("bag", "tyre"))
    with pytest.raises(ValueError, match="tyre"):
        load_data(str(tmp_path), workers=0)


def test_single_root_split_is_reproducible_and_disjoint(tmp_path):
    total = make_folder(tmp_path, per_class=10)

    def split(seed: int) -> tuple[set, set]:
        b = load_data(str(tmp_path), (3, 8, 8), val_split=0.3, seed=seed, workers=0)
        return {p for p, _ in b.train_loader.dataset.samples}, {
            p for p, _ in b.val_loader.dataset.samples
        }

    train, val = split(0)
    assert len(val) == 9 and not train & val and len(train | val) == total
    assert split(0) == (train, val)
    assert split(1)[1] != val


def test_single_root_needs_val_split(tmp_path):
    make_folder(tmp_path, per_class=2)
    with pytest.raises(ValueError, match="val_split"):
        load_data(str(tmp_path), workers=0)


def test_root_without_class_folders_is_rejected(tmp_path):
    make_image(tmp_path / "loose.png", (8, 8), "RGB", 0)
    with pytest.raises(ValueError, match="no class folders"):
        load_data(str(tmp_path), val_split=0.5, workers=0)
    with pytest.raises(ValueError, match="no class folders"):
        scan_image_folder(tmp_path)


def test_missing_directory_and_bad_input_size(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither"):
        load_data(str(tmp_path / "absent"), workers=0)
    with pytest.raises(ValueError, match="input_size"):
        load_data(str(tmp_path), (4, 32, 32), workers=0)


def test_image_that_fails_only_at_decode_is_replaced(tmp_path, caplog):
    make_folder(tmp_path, per_class=2)
    good = tmp_path / "whole.jpg"
    make_image(good, (64, 64), "RGB", 3)
    cut = tmp_path / "bag" / "img00_cut.jpg"
    data = good.read_bytes()
    cut.write_bytes(data[: len(data) // 2])  # headers intact: passes verify(), fails to decode
    bundle = load_data(str(tmp_path), (3, 8, 8), val_split=0.5, seed=0, workers=0)
    dataset = next(
        d
        for d in (bundle.train_loader.dataset, bundle.val_loader.dataset)
        if str(cut) in [p for p, _ in d.samples]
    )
    index = [p for p, _ in dataset.samples].index(str(cut))
    with caplog.at_level(logging.WARNING, logger="decomp.data"):
        x, _ = dataset[index]
    assert x.shape == (3, 8, 8) and dataset.decode_failures == 1
    assert any(str(cut) in record.getMessage() for record in caplog.records)


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
