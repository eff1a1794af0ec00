"""Datasets and loaders: :func:`load_data` turns a data spec into a :class:`DataBundle`.

- ``"fashion-mnist"`` reads the Debian package's files in ``/usr/share/datasets/fashion-mnist``;
  ``"fashion-mnist:/some/dir"`` reads the same four IDX files from another folder
  (:mod:`decomp.data.fashion_mnist`).
- A directory path is an ImageFolder (:mod:`decomp.data.image_folder`).

:func:`calibration_data` gives the calibration batches of a spec (its training images, not
augmented, in a seeded order), with no validation split needed.

Geometry: Fashion-MNIST images (28x28 grey) are padded with zeros, centred, to a larger model input
(28 -> 32 adds 2 px a side) and resized to a smaller one; ImageFolder images of any size are
squashed to the model's (H, W), or resized and centre-cropped (a :class:`Preprocessing`, which also
sets the normalization: default ImageNet's statistics for a folder, Fashion-MNIST's own for it).
Either way grey is replicated to 3 channels or colour turned grey, to match the model. Training
adds a random horizontal flip and a random shift of up to 2 px (4 px for inputs larger than 32),
zero filled (:mod:`decomp.data.transforms`). The validation hold-out and training subsets are
stratified and seeded (:mod:`decomp.data.splits`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from decomp._utils import check_input_size
from decomp.data import fashion_mnist, image_folder
from decomp.data.preprocessing import (
    NORMALIZATIONS,
    RESIZES,
    Preprocessing,
    parse_preprocessing,
    recorded_preprocessing,
)

__all__ = [
    "NORMALIZATIONS",
    "RESIZES",
    "CalibrationData",
    "DataBundle",
    "Preprocessing",
    "calibration_data",
    "default_workers",
    "load_data",
    "make_loader",
    "parse_preprocessing",
    "recorded_preprocessing",
]

logger = logging.getLogger(__name__)


@dataclass
class DataBundle:
    """Loaders and facts about one dataset, as :func:`load_data` returns them.

    Attributes:
        train_loader: Shuffled, augmented training batches ``(x, y)``, x float ``(B, C, H, W)``.
        val_loader: The validation set for model selection (not augmented).
        test_loader: A held-out test set (Fashion-MNIST's t10k, or ``root/test``), else None.
        class_names: Class names, index = label.
        num_classes: ``len(class_names)``.
        input_size: ``(C, H, W)`` of every batch item.
        mean: Per-channel normalization mean used.
        std: Per-channel normalization std used.
        preprocessing: The preprocessing used, one mean and std per channel (None for a bundle
            built by hand).
        train_sampler: The train loader's sampler when distributed or given (call
            ``set_epoch`` on a DistributedSampler every epoch), else None.
        skipped: Unreadable image files excluded, over all splits.
    """

    train_loader: DataLoader
    val_loader: DataLoader
    test_loader: DataLoader | None
    class_names: list[str]
    num_classes: int
    input_size: tuple[int, int, int]
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    train_sampler: Sampler | None = None
    skipped: int = 0
    skipped_files: list[str] = field(default_factory=list)
    preprocessing: Preprocessing | None = None


@dataclass
class CalibrationData:
    """Calibration batches of a data spec, as :func:`calibration_data` returns them.

    Attributes:
        loader: ``(x, y)`` batches, not augmented, the same ones (in a seeded order) on every pass.
        images: How many images the loader holds.
        preprocessing: The preprocessing used, one mean and std per channel.
        skipped: Unreadable image files excluded.
    """

    loader: DataLoader
    images: int
    preprocessing: Preprocessing
    skipped: int = 0


# --------------------------------------------------------------------------- loaders


def default_workers() -> int:
    """``min(4, os.cpu_count())``."""
    return min(4, os.cpu_count() or 1)


def make_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool,
    workers: int,
    seed: int = 0,
    sampler: Sampler | None = None,
) -> DataLoader:
    """A DataLoader with the project's defaults.

    Seeded shuffling (so worker augmentation seeds follow too), persistent workers when
    ``workers > 0``, pinned memory when CUDA is available, ``drop_last=False``.
    """
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle and sampler is None,
        sampler=sampler,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=torch.cuda.is_available(),
        generator=generator,
        drop_last=False,
    )


def _parse_spec(spec: str) -> tuple[str, Path]:
    """``("fashion-mnist", folder)`` or ``("folder", path)`` from a data spec."""
    text = str(spec)
    name, _, rest = text.partition(":")
    if name.strip().lower() in ("fashion-mnist", "fashion_mnist", "fashionmnist", "fmnist"):
        return "fashion-mnist", Path(rest).expanduser() if rest else fashion_mnist.FASHION_MNIST_DIR
    path = Path(text).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(
            f"data {text!r} is neither 'fashion-mnist[:DIR]' nor an existing directory"
        )
    return "folder", path


def _resolved(kind: str, preprocessing: Preprocessing | None, channels: int) -> Preprocessing:
    """``preprocessing`` (default: the defaults) with one mean and std per channel; the data's
    own statistics fill what it leaves None."""
    own = fashion_mnist.norm_stats if kind == "fashion-mnist" else image_folder.norm_stats
    return (preprocessing or Preprocessing()).for_channels(channels, own(channels))


def _train_sampler(
    dataset: Dataset, sampler: Sampler | None, distributed: bool | None, seed: int
) -> Sampler | None:
    """The given sampler, else a DistributedSampler when distributed (auto: process group up)."""
    if sampler is not None:
        return sampler
    if distributed is None:
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if not distributed:
        return None
    from torch.utils.data.distributed import DistributedSampler

    return DistributedSampler(dataset, shuffle=True, seed=seed, drop_last=False)


def load_data(
    spec: str,
    input_size: Sequence[int] = (3, 32, 32),
    batch_size: int = 128,
    val_split: float | int | None = None,
    seed: int = 0,
    workers: int | None = None,
    train_subset: int | None = None,
    sampler: Sampler | None = None,
    distributed: bool | None = None,
    verify: bool = True,
    preprocessing: Preprocessing | None = None,
) -> DataBundle:
    """Build train / validation / test loaders from a data spec.

    Args:
        spec: ``"fashion-mnist"``, ``"fashion-mnist:/dir"`` or an ImageFolder directory.
        input_size: ``(C, H, W)`` of the model input; C is 1 or 3.
        batch_size: Batch size of every loader.
        val_split: Validation hold-out, a fraction or a count (Fashion-MNIST default 5,000;
            required for an ImageFolder without ``val/``).
        seed: Seeds the split, the subset and the shuffling.
        workers: DataLoader workers; default ``min(4, os.cpu_count())``.
        train_subset: Keep at most this many training items (quick runs).
        sampler: A sampler for the train loader (replaces shuffling).
        distributed: Use a DistributedSampler for the train loader; default: when a
            ``torch.distributed`` process group is initialized.
        verify: ImageFolder only: check every file up front (see the module docstring).
        preprocessing: Normalization and resizing (:class:`Preprocessing`); default the data's
            own statistics (ImageNet's for a folder) and a squash to the input size.

    Returns:
        The :class:`DataBundle`.
    """
    size = check_input_size(input_size, channels=(1, 3))
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    workers = default_workers() if workers is None else int(workers)
    kind, path = _parse_spec(spec)
    prep = _resolved(kind, preprocessing, size[0])
    if kind == "fashion-mnist":
        train, val, test = fashion_mnist.fashion_mnist_datasets(
            path, size, val_split, seed, train_subset, prep.mean, prep.std
        )
        names, skipped = list(fashion_mnist.FASHION_MNIST_CLASSES), []
    else:
        train, val, test, skipped = image_folder.image_folder_datasets(
            path, size, val_split, seed, train_subset, verify, prep
        )
        names = train.class_names
    train_sampler = _train_sampler(train, sampler, distributed, seed)
    logger.info(
        "data %s: %d train, %d val, %s test, %d classes, %d unreadable files skipped; %s",
        spec,
        len(train),
        len(val),
        len(test) if test is not None else "no",
        len(names),
        len(skipped),
        prep.to_dict(),
    )
    return DataBundle(
        train_loader=make_loader(train, batch_size, True, workers, seed, train_sampler),
        val_loader=make_loader(val, batch_size, False, workers, seed),
        test_loader=make_loader(test, batch_size, False, workers, seed)
        if test is not None
        else None,
        class_names=names,
        num_classes=len(names),
        input_size=size,
        mean=tuple(prep.mean or ()),
        std=tuple(prep.std or ()),
        train_sampler=train_sampler,
        skipped=len(skipped),
        skipped_files=skipped,
        preprocessing=prep,
    )


def calibration_data(
    spec: str,
    input_size: Sequence[int],
    preprocessing: Preprocessing | None = None,
    *,
    batch_size: int = 128,
    seed: int = 0,
    workers: int | None = None,
    verify: bool = True,
) -> CalibrationData:
    """The calibration batches of a data spec: no augmentation, no validation split needed.

    The training images (Fashion-MNIST's 60k; an ImageFolder's ``train/``, or every image of a
    folder that only has class folders), with the evaluation transform, in a seeded order that
    every pass repeats (so batch-norm calibration and output-aware fitting see the same batches).

    Args:
        spec: ``"fashion-mnist"``, ``"fashion-mnist:/dir"`` or an ImageFolder directory.
        input_size: ``(C, H, W)`` of the model input; C is 1 or 3.
        preprocessing: As for :func:`load_data`.
        batch_size: Images per batch.
        seed: Seeds the order.
        workers: DataLoader workers; default ``min(4, os.cpu_count())``.
        verify: ImageFolder only: check every file up front.

    Returns:
        The :class:`CalibrationData`.
    """
    size = check_input_size(input_size, channels=(1, 3))
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    kind, path = _parse_spec(spec)
    prep = _resolved(kind, preprocessing, size[0])
    if kind == "fashion-mnist":
        dataset = fashion_mnist.calibration_dataset(path, size, prep.mean, prep.std, seed)
    else:
        dataset = image_folder.calibration_dataset(path, size, prep, seed, verify)
    workers = default_workers() if workers is None else int(workers)
    loader = make_loader(dataset, batch_size, False, workers, seed)
    logger.info("calibration data %s: %d images; %s", spec, len(dataset), prep.to_dict())
    return CalibrationData(loader, len(dataset), prep, dataset.skipped)
