"""Datasets and loaders: Fashion-MNIST from its IDX files, and any ImageFolder directory.

One entry point, :func:`load_data`, turns a spec into a :class:`DataBundle` of loaders:

- ``"fashion-mnist"`` reads the Debian package's files in ``/usr/share/datasets/fashion-mnist``;
  ``"fashion-mnist:/some/dir"`` reads the same four IDX files (``.gz`` or not) from another folder.
  Train = the 60k train images less a seeded, stratified hold-out (5,000 by default) that is the
  validation set; test = the official 10k t10k images. Nothing is ever downloaded.
- A directory path is an ImageFolder (the competition's TACO layout): ``root/train/<class>/*`` and
  ``root/val/<class>/*`` (plus an optional ``root/test/<class>/*``), or one root of class folders
  (or a ``train/`` alone) split into train and validation by ``val_split``, stratified and seeded.

Geometry: Fashion-MNIST images (28x28 grey) are padded with zeros, centred, to a larger model input
(28 -> 32 adds 2 px a side) and resized to a smaller one; ImageFolder images of any size are resized
to the model's (H, W). Either way grey is replicated to 3 channels or colour turned grey, to match
the model. Training adds a random horizontal flip and a random shift of up to 2 px (4 px for
inputs larger than 32), zero filled.

Fashion-MNIST is held in memory as one uint8 tensor and transformed a whole batch at a time
(``__getitems__``), so an epoch of data costs about a second, not a minute. ImageFolder images go
through per-item ``torchvision.transforms.v2``.

Unreadable images: every ImageFolder file is checked once, up front, with ``PIL.Image.open`` and
``Image.verify()`` (reads headers and, for PNG, checksums; cheap), so a corrupt file is excluded
before training, logged as a warning that names it, and counted in ``dataset.skipped`` and
``DataBundle.skipped``. A file that passes the check but fails to decode later is logged and
replaced by the next readable sample, never a crash.
"""

from __future__ import annotations

import gzip
import logging
import os
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

logger = logging.getLogger(__name__)

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
FASHION_MNIST_MEAN = (0.2860,)
FASHION_MNIST_STD = (0.3530,)
FASHION_MNIST_VAL = 5000
"""Default size of the validation hold-out taken from the Fashion-MNIST train set."""
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
_MISSING_HINT = (
    "install the Debian package dataset-fashion-mnist (make install does) "
    "or pass a folder with the IDX files, as fashion-mnist:/path/to/dir"
)
_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


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


# --------------------------------------------------------------------------- IDX files


def _read_bytes(path: Path) -> bytes:
    """The file's bytes, gunzipped when the name ends in .gz; ValueError naming a bad gzip."""
    if path.suffix != ".gz":
        return path.read_bytes()
    try:
        with gzip.open(path, "rb") as f:
            return f.read()
    except (OSError, EOFError) as err:
        raise ValueError(f"{path}: not a readable gzip file ({err})") from err


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read one IDX file (the MNIST format), gzipped or not.

    Args:
        path: The file.

    Returns:
        An array of the header's shape and type (uint8 for Fashion-MNIST).

    Raises:
        ValueError: bad magic number, unknown type code, or fewer data bytes than the header says.
    """
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an IDX file (bad magic number {data[:4].hex() or 'empty'})")
    dtype, ndim = _IDX_DTYPES[data[2]], data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(data)} bytes)")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) - header != expected:
        raise ValueError(
            f"{path}: truncated or oversized IDX file: header says {shape} "
            f"({expected} data bytes), found {len(data) - header}"
        )
    array = np.frombuffer(data, dtype=dtype, count=expected // dtype.itemsize, offset=header)
    return array.reshape(shape).astype(dtype.newbyteorder("="), copy=False)


def _find_idx(folder: Path, stem: str) -> Path:
    """The path of ``stem.gz`` or ``stem`` in ``folder``; FileNotFoundError with the fix."""
    for candidate in (folder / f"{stem}.gz", folder / stem):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{folder} has no {stem}[.gz]: {_MISSING_HINT}")


def read_fashion_mnist(
    folder: str | os.PathLike[str] = FASHION_MNIST_DIR, split: str = "train"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Read one Fashion-MNIST split from its IDX files.

    Args:
        folder: The folder holding the four IDX files.
        split: ``"train"`` (60k) or ``"test"`` (10k).

    Returns:
        ``(images, labels)``: uint8 ``(N, 28, 28)`` and int64 ``(N,)``.
    """
    folder = Path(folder)
    if split not in FASHION_MNIST_FILES:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(FASHION_MNIST_FILES)}")
    if not folder.is_dir():
        raise FileNotFoundError(f"Fashion-MNIST folder {folder} does not exist: {_MISSING_HINT}")
    image_path, label_path = (_find_idx(folder, stem) for stem in FASHION_MNIST_FILES[split])
    images, labels = read_idx(image_path), read_idx(label_path)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(
            f"{image_path} / {label_path}: expected (N, H, W) images and (N,) labels; "
            f"got {images.shape} and {labels.shape}"
        )
    if labels.size and labels.max() >= len(FASHION_MNIST_CLASSES):
        raise ValueError(f"{label_path}: label {labels.max()} outside 0..9")
    return torch.from_numpy(images.astype(np.uint8)), torch.from_numpy(labels.astype(np.int64))


# --------------------------------------------------------------------------- batch transforms


def fit_images(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bring uint8 images ``(N, C, h, w)`` to ``(N, C, H, W)``: centred zero padding if they fit,
    else an antialiased bilinear resize."""
    height, width = images.shape[-2:]
    top, left = size[0] - height, size[1] - width
    if top >= 0 and left >= 0:
        pad = (left // 2, left - left // 2, top // 2, top - top // 2)
        return F.pad(images, pad)
    resized = F.interpolate(images.float(), size=size, mode="bilinear", antialias=True)
    return resized.round().clamp(0, 255).to(torch.uint8)


def random_hflip(images: torch.Tensor, p: float = 0.5) -> torch.Tensor:
    """Flip each image of ``(N, C, H, W)`` left-right with probability ``p``, independently."""
    flip = torch.rand(images.shape[0]) < p
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


def random_shift(images: torch.Tensor, pad: int) -> torch.Tensor:
    """Shift each image of ``(N, C, H, W)`` by its own random offset in ``[-pad, pad]`` px per
    axis, filling with zeros (a random crop of the zero-padded image)."""
    if pad <= 0:
        return images
    n, _, height, width = images.shape
    padded = F.pad(images, (pad, pad, pad, pad))
    rows = torch.randint(0, 2 * pad + 1, (n, 1)) + torch.arange(height)
    cols = torch.randint(0, 2 * pad + 1, (n, 1)) + torch.arange(width)
    batch = torch.arange(n)[:, None, None]
    out = padded[batch, :, rows[:, :, None], cols[:, None, :]]  # (N, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()


def _shift_pad(size: Sequence[int]) -> int:
    """Augmentation shift in pixels: 2 up to 32 px inputs, 4 above."""
    return 2 if min(size) <= 32 else 4


class TensorImageDataset(Dataset):
    """Images held in memory as uint8 ``(N, c, H, W)``, already at the model's (H, W).

    Items are float ``(C, H, W)`` normalized tensors; grey (c = 1) is replicated when C = 3.
    ``__getitems__`` transforms a whole batch at once, which the DataLoader uses.

    Args:
        images: uint8 ``(N, c, H, W)`` with c = 1 or C.
        labels: int64 ``(N,)``.
        channels: C, the model's input channels (1 or 3).
        mean: Per-channel mean (one value, or C).
        std: Per-channel std (one value, or C).
        augment: Random flip and shift per item.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        channels: int,
        mean: Sequence[float],
        std: Sequence[float],
        augment: bool = False,
    ) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4 or len(images) != len(labels):
            raise ValueError(
                f"expected uint8 (N, C, H, W) images and N labels; got {images.dtype} "
                f"{tuple(images.shape)} and {len(labels)} labels"
            )
        self.images, self.targets = images, labels
        self.channels, self.augment = channels, augment
        if images.shape[1] == 1 and len(set(mean)) == 1 and len(set(std)) == 1:
            mean, std = mean[:1], std[:1]  # normalize the grey plane once, then replicate
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.pad = _shift_pad(images.shape[-2:])
        self.skipped = 0

    def __len__(self) -> int:
        return len(self.targets)

    def transform(self, batch: torch.Tensor) -> torch.Tensor:
        """uint8 ``(B, c, H, W)`` -> normalized float ``(B, C, H, W)``, augmented if training."""
        if self.augment:
            batch = random_shift(random_hflip(batch), self.pad)
        x = batch.float().div_(255.0)
        if x.shape[1] != self.mean.shape[1]:  # grey source, per-channel statistics
            x = x.expand(-1, self.mean.shape[1], -1, -1)
        x = (x - self.mean) / self.std
        if x.shape[1] != self.channels:  # grey to RGB: a view, copied once by the collate
            x = x.expand(-1, self.channels, -1, -1)
        return x

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.images[index : index + 1])[0], int(self.targets[index])

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[torch.Tensor, int]]:
        index = torch.as_tensor(indices, dtype=torch.long)
        batch = self.transform(self.images[index])
        return list(zip(batch.unbind(0), self.targets[index].tolist(), strict=True))


# --------------------------------------------------------------------------- ImageFolder


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


def image_transform(
    input_size: Sequence[int], mean: Sequence[float], std: Sequence[float], train: bool
) -> Callable[[Image.Image], torch.Tensor]:
    """The ``transforms.v2`` pipeline for a PIL image: resize to (H, W), [flip, shift], scale,
    normalize."""
    from torchvision.transforms import v2

    size = (int(input_size[1]), int(input_size[2]))
    ops: list[Any] = [v2.ToImage(), v2.Resize(size, antialias=True)]
    if train:
        ops += [v2.RandomHorizontalFlip(), v2.RandomCrop(size, padding=_shift_pad(size))]
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


# --------------------------------------------------------------------------- splits


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


def _subset(indices: np.ndarray, labels: torch.Tensor, size: int | None, seed: int) -> np.ndarray:
    """At most ``size`` of ``indices``, chosen stratified by label and seeded."""
    if size is None or size >= len(indices):
        return indices
    if size < 1:
        raise ValueError(f"train_subset must be >= 1; got {size}")
    _, keep = stratified_split(labels[indices].numpy(), size, seed + 1)
    return indices[keep]


# --------------------------------------------------------------------------- datasets


def fashion_mnist_datasets(
    folder: str | os.PathLike[str] = FASHION_MNIST_DIR,
    input_size: Sequence[int] = (3, 32, 32),
    val_split: float | int | None = None,
    seed: int = 0,
    train_subset: int | None = None,
) -> tuple[TensorImageDataset, TensorImageDataset, TensorImageDataset]:
    """Fashion-MNIST as (train, validation hold-out of train, official test) datasets.

    Args:
        folder: The folder with the four IDX files.
        input_size: ``(C, H, W)`` of the model input.
        val_split: Hold-out of the train set, a fraction or a count (default 5,000).
        seed: Seed of the hold-out and of ``train_subset``.
        train_subset: Keep at most this many training images (stratified).

    Returns:
        ``(train, val, test)``, items float ``(C, H, W)``.
    """
    channels, size = input_size[0], (input_size[1], input_size[2])
    images, labels = read_fashion_mnist(folder, "train")
    test_images, test_labels = read_fashion_mnist(folder, "test")
    train_idx, val_idx = stratified_split(
        labels, FASHION_MNIST_VAL if val_split is None else val_split, seed
    )
    train_idx = _subset(train_idx, labels, train_subset, seed)
    images = fit_images(images[:, None], size)
    test_images = fit_images(test_images[:, None], size)
    mean, std = _norm_stats(channels, fashion=True)

    def make(x: torch.Tensor, y: torch.Tensor, augment: bool) -> TensorImageDataset:
        return TensorImageDataset(x.contiguous(), y, channels, mean, std, augment)

    train_t, val_t = torch.from_numpy(train_idx), torch.from_numpy(val_idx)
    return (
        make(images[train_t], labels[train_t], True),
        make(images[val_t], labels[val_t], False),
        make(test_images, test_labels, False),
    )


def _folder_split(
    root: Path, channels: int, names: Sequence[str] | None, verify: bool
) -> ImageFileDataset:
    """Scan one ImageFolder split into an ImageFileDataset without a transform yet."""
    samples, names, skipped = scan_image_folder(root, names, verify)
    return ImageFileDataset(
        samples, names, channels, transform=lambda image: image, skipped_files=skipped
    )


def image_folder_datasets(
    root: str | os.PathLike[str],
    input_size: Sequence[int] = (3, 32, 32),
    val_split: float | int | None = None,
    seed: int = 0,
    train_subset: int | None = None,
    verify: bool = True,
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

    Returns:
        ``(train, val, test, skipped_files)``.
    """
    root = Path(root)
    channels = input_size[0]
    mean, std = _norm_stats(channels, fashion=False)
    has_train = (root / "train").is_dir()
    if (root / "val").is_dir() and not has_train:
        raise ValueError(f"{root} has a val/ folder but no train/ folder beside it")
    train_root = root / "train" if has_train else root
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
            f"{root} has no train/ and val/ folders; pass val_split (e.g. 0.2) to hold out "
            f"part of {train_root} for validation"
        )
    else:
        val = full
        train_idx, val_idx = stratified_split(full.targets, val_split, seed)
    train_idx = _subset(train_idx, full.targets, train_subset, seed)
    test = None
    if (root / "test").is_dir() and train_root != root:
        test_raw = _folder_split(root / "test", channels, full.class_names, verify)
        skipped += test_raw.skipped_files
        test = _with_transform(
            test_raw, image_transform(input_size, mean, std, False), range(len(test_raw))
        )
    eval_tf = image_transform(input_size, mean, std, False)
    return (
        _with_transform(full, image_transform(input_size, mean, std, True), train_idx),
        _with_transform(val, eval_tf, val_idx),
        test,
        skipped,
    )


def _norm_stats(channels: int, fashion: bool) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Normalization mean and std for ``channels`` (Fashion-MNIST's or ImageNet's)."""
    if fashion:
        return FASHION_MNIST_MEAN * channels, FASHION_MNIST_STD * channels
    if channels == 1:
        return (sum(IMAGENET_MEAN) / 3,), (sum(IMAGENET_STD) / 3,)
    return IMAGENET_MEAN, IMAGENET_STD


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
        return "fashion-mnist", Path(rest).expanduser() if rest else FASHION_MNIST_DIR
    path = Path(text).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(
            f"data {text!r} is neither 'fashion-mnist[:DIR]' nor an existing directory"
        )
    return "folder", path


def _check_input(input_size: Sequence[int]) -> tuple[int, int, int]:
    """``input_size`` as ``(C, H, W)`` with C in {1, 3}; ValueError otherwise."""
    size = tuple(int(s) for s in input_size)
    if len(size) != 3 or size[0] not in (1, 3) or min(size) < 1:
        raise ValueError(f"input_size must be (C, H, W) with C 1 or 3; got {tuple(input_size)}")
    return size  # type: ignore[return-value]


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

    Returns:
        The :class:`DataBundle`.
    """
    size = _check_input(input_size)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    workers = default_workers() if workers is None else int(workers)
    kind, path = _parse_spec(spec)
    if kind == "fashion-mnist":
        train, val, test = fashion_mnist_datasets(path, size, val_split, seed, train_subset)
        names, skipped = list(FASHION_MNIST_CLASSES), []
    else:
        train, val, test, skipped = image_folder_datasets(
            path, size, val_split, seed, train_subset, verify
        )
        names = train.class_names
    mean, std = _norm_stats(size[0], fashion=kind == "fashion-mnist")
    train_sampler = _train_sampler(train, sampler, distributed, seed)
    logger.info(
        "data %s: %d train, %d val, %s test, %d classes, %d unreadable files skipped",
        spec,
        len(train),
        len(val),
        len(test) if test is not None else "no",
        len(names),
        len(skipped),
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
        mean=tuple(mean),
        std=tuple(std),
        train_sampler=train_sampler,
        skipped=len(skipped),
        skipped_files=skipped,
    )
