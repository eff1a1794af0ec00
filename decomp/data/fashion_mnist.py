"""Fashion-MNIST from its IDX files, held in memory and transformed a whole batch at a time.

``read_fashion_mnist`` reads the four IDX files (``.gz`` or not) of the Debian package
``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``) or of another folder. The
images (28x28 grey) are padded with zeros, centred, to a larger model input and resized to a
smaller one, kept as one uint8 tensor, and normalised (and augmented, for training) a batch at a
time through ``__getitems__``, so an epoch of data costs about a second, not a minute. Train = the
60k train images less a seeded, stratified hold-out (5,000 by default) that is the validation set;
test = the official 10k t10k images. Nothing is ever downloaded.
"""

from __future__ import annotations

import gzip
import os
import struct
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from decomp.data.splits import stratified_split, stratified_subset
from decomp.data.transforms import fit_images, random_hflip, random_shift, shift_pad

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


# --------------------------------------------------------------------------- data sets


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
        self.pad = shift_pad(images.shape[-2:])
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


def fashion_mnist_datasets(
    folder: str | os.PathLike[str] = FASHION_MNIST_DIR,
    input_size: Sequence[int] = (3, 32, 32),
    val_split: float | int | None = None,
    seed: int = 0,
    train_subset: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> tuple[TensorImageDataset, TensorImageDataset, TensorImageDataset]:
    """Fashion-MNIST as (train, validation hold-out of train, official test) datasets.

    Args:
        folder: The folder with the four IDX files.
        input_size: ``(C, H, W)`` of the model input.
        val_split: Hold-out of the train set, a fraction or a count (default 5,000).
        seed: Seed of the hold-out and of ``train_subset``.
        train_subset: Keep at most this many training images (stratified).
        mean, std: Per-channel normalization; default Fashion-MNIST's own (:func:`norm_stats`).

    Returns:
        ``(train, val, test)``, items float ``(C, H, W)``.
    """
    channels, size = input_size[0], (input_size[1], input_size[2])
    images, labels = read_fashion_mnist(folder, "train")
    test_images, test_labels = read_fashion_mnist(folder, "test")
    train_idx, val_idx = stratified_split(
        labels, FASHION_MNIST_VAL if val_split is None else val_split, seed
    )
    train_idx = stratified_subset(train_idx, labels, train_subset, seed)
    images = fit_images(images[:, None], size)
    test_images = fit_images(test_images[:, None], size)
    own = norm_stats(channels)
    mean, std = mean or own[0], std or own[1]

    def make(x: torch.Tensor, y: torch.Tensor, augment: bool) -> TensorImageDataset:
        return TensorImageDataset(x.contiguous(), y, channels, mean, std, augment)

    train_t, val_t = torch.from_numpy(train_idx), torch.from_numpy(val_idx)
    return (
        make(images[train_t], labels[train_t], True),
        make(images[val_t], labels[val_t], False),
        make(test_images, test_labels, False),
    )


def calibration_dataset(
    folder: str | os.PathLike[str],
    input_size: Sequence[int],
    mean: Sequence[float],
    std: Sequence[float],
    seed: int = 0,
) -> TensorImageDataset:
    """The 60k training images in a seeded order, not augmented: calibration data."""
    images, labels = read_fashion_mnist(folder, "train")
    order = torch.from_numpy(np.random.default_rng(seed).permutation(len(labels)))
    fitted = fit_images(images[order, None], (input_size[1], input_size[2]))
    return TensorImageDataset(fitted.contiguous(), labels[order], input_size[0], mean, std)


def norm_stats(channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Fashion-MNIST's normalization mean and std, repeated for ``channels``."""
    return FASHION_MNIST_MEAN * channels, FASHION_MNIST_STD * channels
