"""decomp.data.image_folder and load_data on a folder: layouts, modes, unreadable files."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from decomp.data import load_data
from decomp.data.image_folder import scan_image_folder

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
