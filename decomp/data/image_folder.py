"""ImageFolder directories (the competition's TACO layout): class folders of image files.

Layouts: ``root/train/<class>/*`` and ``root/val/<class>/*`` (plus an optional
``root/test/<class>/*``), or one root of class folders (or a ``train/`` alone) split into train and
validation by ``val_split``, stratified and seeded. Images of any size and mode are converted to
the model's channels and brought to its (H, W) as a
:class:`~decomp.data.preprocessing.Preprocessing` says (squashed, or resized and centre-cropped),
through per-item ``torchvision.transforms.v2``.

Unreadable images: every file is checked once, up front, with ``PIL.Image.open`` and
``Image.verify()`` (reads headers and, for PNG, checksums; cheap), so a corrupt file is excluded
before training, logged as a warning that names it, and counted in ``dataset.skipped`` and
``DataBundle.skipped``. A file that passes the check but fails to decode later is logged and
replaced by the next readable sample, never a crash.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from decomp.data.preprocessing import IMAGENET_MEAN, IMAGENET_STD, Preprocessing
from decomp.data.splits import stratified_split, stratified_subset
from decomp.data.transforms import shift_pad

logger = logging.getLogger(__name__)

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


def _to_channels(image: Image.Image, channels: int) -> Image.Image:
    """Convert any PIL mode to ``L`` (1 channel) or ``RGB`` (3); alpha composites onto black."""
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (0, 0, 0))
        background.paste(rgba, mask=rgba.getchannel("A"))
        image = background
    return image.convert("L" if channels == 1 else "RGB")


def load_image(path: str | os.PathLike[str], channels: int) -> Image.Image:
    """Open and decode one image file as ``L`` or ``RGB``."""
    with Image.open(path) as image:
        image.load()
        return _to_channels(image, channels)


def is_readable_image(path: str | os.PathLike[str]) -> bool:
    """Cheap check: PIL identifies the file and ``verify()`` passes. Logs a warning if not."""
    try:
        with Image.open(path) as image:
            image.verify()
        return True
    except Exception as err:  # PIL raises many types for bad files
        logger.warning("skipping unreadable image %s: %s", path, err)
        return False


def find_classes(root: str | os.PathLike[str]) -> list[str]:
    """Sorted names of the class sub-folders of ``root``; ValueError if there are none."""
    root = Path(root)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ValueError(
            f"{root} has no class folders: expected {root}/<class>/<image files> "
            f"(or {root}/train/<class>/... and {root}/val/<class>/...)"
        )
    return classes


def scan_image_folder(
    root: str | os.PathLike[str], class_names: Sequence[str] | None = None, verify: bool = True
) -> tuple[list[tuple[str, int]], list[str], list[str]]:
    """List the images under ``root/<class>/`` (recursively, sorted).

    Args:
        root: A folder of class folders.
        class_names: Fix the label order (e.g. the train split's); a folder not in it is an error.
            Defaults to the sorted folder names.
        verify: Check every file with :func:`is_readable_image` and exclude failures.

    Returns:
        ``(samples, class_names, skipped)``: ``(path, label)`` pairs, the class names, and the
        paths excluded as unreadable.
    """
    root = Path(root)
    found = find_classes(root)
    names = list(found if class_names is None else class_names)
    unknown = sorted(set(found) - set(names))
    if unknown:
        raise ValueError(f"{root} has class folders {unknown} that are not among {names}")
    samples, skipped = [], []
    for label, name in enumerate(names):
        files = sorted(p for p in (root / name).rglob("*") if p.suffix.lower() in IMG_EXTENSIONS)
        for path in files:
            if verify and not is_readable_image(path):
                skipped.append(str(path))
            else:
                samples.append((str(path), label))
    if not samples:
        raise ValueError(f"{root} holds no readable images with extensions {IMG_EXTENSIONS}")
    return samples, names, skipped


class CoverResize:
    """Resize an image, keeping its aspect ratio, to cover ``size`` / ``fraction``: the first
    step of a centre crop (``fraction`` of the resized image is kept)."""

    def __init__(self, size: tuple[int, int], fraction: float) -> None:
        self.size, self.fraction = size, fraction

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        from torchvision.transforms.v2 import functional

        height, width = image.shape[-2:]
        scale = max(self.size[0] / height, self.size[1] / width) / self.fraction
        shape = [max(round(height * scale), self.size[0]), max(round(width * scale), self.size[1])]
        return functional.resize(image, shape, antialias=True)


def image_transform(
    input_size: Sequence[int], preprocessing: Preprocessing, train: bool
) -> Callable[[Image.Image], torch.Tensor]:
    """The ``transforms.v2`` pipeline for a PIL image: squash to (H, W), or resize and take the
    centre (H, W); [flip, shift]; scale to [0, 1]; normalize. ``preprocessing`` holds one mean
    and std per channel (:meth:`Preprocessing.for_channels`)."""
    from torchvision.transforms import v2

    size = (int(input_size[1]), int(input_size[2]))
    ops: list[Any] = [v2.ToImage()]
    if preprocessing.resize == "crop":
        ops += [CoverResize(size, preprocessing.crop_fraction), v2.CenterCrop(size)]
    else:
        ops += [v2.Resize(size, antialias=True)]
    if train:
        ops += [v2.RandomHorizontalFlip(), v2.RandomCrop(size, padding=shift_pad(size))]
    mean, std = preprocessing.mean, preprocessing.std
    assert mean is not None and std is not None, "resolve with Preprocessing.for_channels first"
    ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    return v2.Compose(ops)


class ImageFileDataset(Dataset):
    """Image files with labels, decoded on access and converted to the model's channels.

    Args:
        samples: ``(path, label)`` pairs.
        class_names: Names, index = label.
        channels: 1 (grey) or 3 (RGB).
        transform: PIL image -> float tensor ``(C, H, W)``.
        skipped_files: Paths excluded before this dataset was built (reported, not used).
    """

    def __init__(
        self,
        samples: Sequence[tuple[str, int]],
        class_names: Sequence[str],
        channels: int,
        transform: Callable[[Image.Image], torch.Tensor],
        skipped_files: Sequence[str] = (),
    ) -> None:
        self.samples = list(samples)
        self.targets = torch.tensor([label for _, label in self.samples], dtype=torch.long)
        self.class_names = list(class_names)
        self.channels, self.transform = channels, transform
        self.skipped_files = list(skipped_files)
        self.skipped = len(self.skipped_files)
        self.decode_failures = 0  # per process: workers count their own

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        for offset in range(len(self.samples)):
            path, label = self.samples[(index + offset) % len(self.samples)]
            try:
                image = load_image(path, self.channels)
            except Exception as err:  # a file that passed verify() but does not decode
                self.decode_failures += 1
                logger.warning("cannot decode %s (%s); using the next sample", path, err)
                continue
            return self.transform(image), label
        raise RuntimeError("no image in this dataset can be decoded")


def _with_transform(
    dataset: ImageFileDataset, transform: Callable, indices: Any
) -> ImageFileDataset:
    """A new ImageFileDataset over ``dataset.samples[indices]`` with another transform; it keeps
    the skipped files of the folder it came from."""
    samples = [dataset.samples[i] for i in indices]
    return ImageFileDataset(
        samples, dataset.class_names, dataset.channels, transform, dataset.skipped_files
    )


def _folder_split(
    root: Path, channels: int, names: Sequence[str] | None, verify: bool
) -> ImageFileDataset:
    """Scan one ImageFolder split into an ImageFileDataset without a transform yet."""
    samples, names, skipped = scan_image_folder(root, names, verify)
    return ImageFileDataset(
        samples, names, channels, transform=lambda image: image, skipped_files=skipped
    )


def _train_root(root: Path) -> Path:
    """``root/train`` when there is one, else ``root`` (a folder of class folders)."""
    has_train = (root / "train").is_dir()
    if (root / "val").is_dir() and not has_train:
        raise ValueError(f"{root} has a val/ folder but no train/ folder beside it")
    return root / "train" if has_train else root


def image_folder_datasets(
    root: str | os.PathLike[str],
    input_size: Sequence[int] = (3, 32, 32),
    val_split: float | int | None = None,
    seed: int = 0,
    train_subset: int | None = None,
    verify: bool = True,
    preprocessing: Preprocessing | None = None,
) -> tuple[ImageFileDataset, ImageFileDataset, ImageFileDataset | None, list[str]]:
    """An ImageFolder directory as (train, val, test or None) datasets.

    Layouts: ``root/train`` + ``root/val`` (+ optional ``root/test``); ``root/train`` alone, or
    ``root`` itself holding class folders, split by ``val_split`` (stratified, seeded).

    Args:
        root: The directory.
        input_size: ``(C, H, W)`` of the model input.
        val_split: Validation fraction or count when there is no ``val/`` folder.
        seed: Seed of the split and of ``train_subset``.
        train_subset: Keep at most this many training images (stratified).
        verify: Check files up front and exclude unreadable ones.
        preprocessing: Normalization and resizing; default ImageNet's statistics, squashed.

    Returns:
        ``(train, val, test, skipped_files)``.
    """
    root = Path(root)
    channels = input_size[0]
    prep = (preprocessing or Preprocessing()).for_channels(channels, norm_stats(channels))
    train_root = _train_root(root)
    full = _folder_split(train_root, channels, None, verify)
    skipped = list(full.skipped_files)
    if (root / "val").is_dir() and train_root != root:
        if val_split is not None:
            logger.info("%s has a val/ folder: using it, not val_split=%s", root, val_split)
        val = _folder_split(root / "val", channels, full.class_names, verify)
        skipped += val.skipped_files
        train_idx, val_idx = np.arange(len(full)), np.arange(len(val))
    elif val_split is None:
        raise ValueError(
            f"{root} has no train/ and val/ folders; pass val_split (command line: "
            f"--val-split), e.g. 0.2, to hold out part of {train_root} for validation"
        )
    else:
        val = full
        train_idx, val_idx = stratified_split(full.targets, val_split, seed)
    train_idx = stratified_subset(train_idx, full.targets, train_subset, seed)
    eval_tf = image_transform(input_size, prep, False)
    test = None
    if (root / "test").is_dir() and train_root != root:
        test_raw = _folder_split(root / "test", channels, full.class_names, verify)
        skipped += test_raw.skipped_files
        test = _with_transform(test_raw, eval_tf, range(len(test_raw)))
    return (
        _with_transform(full, image_transform(input_size, prep, True), train_idx),
        _with_transform(val, eval_tf, val_idx),
        test,
        skipped,
    )


def calibration_dataset(
    root: str | os.PathLike[str],
    input_size: Sequence[int],
    preprocessing: Preprocessing | None = None,
    seed: int = 0,
    verify: bool = True,
) -> ImageFileDataset:
    """The training images of an ImageFolder (``root/train``, else every image of ``root``'s
    class folders) in a seeded order, with the evaluation transform; no validation split.

    Args:
        root: The directory.
        input_size: ``(C, H, W)`` of the model input.
        preprocessing: Normalization and resizing; default ImageNet's statistics, squashed.
        seed: Seed of the order.
        verify: Check files up front and exclude unreadable ones.
    """
    channels = input_size[0]
    prep = (preprocessing or Preprocessing()).for_channels(channels, norm_stats(channels))
    full = _folder_split(_train_root(Path(root)), channels, None, verify)
    order = np.random.default_rng(seed).permutation(len(full))
    return _with_transform(full, image_transform(input_size, prep, False), order)


def norm_stats(channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """ImageNet's normalization mean and std; their channel averages for grey inputs."""
    if channels == 1:
        return (sum(IMAGENET_MEAN) / 3,), (sum(IMAGENET_STD) / 3,)
    return IMAGENET_MEAN, IMAGENET_STD
