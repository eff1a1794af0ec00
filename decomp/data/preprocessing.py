"""How an image becomes a model input: normalization and the fit to the model's (H, W).

A :class:`Preprocessing` is plain data. ``load_data`` and ``calibration_data`` take one; the
workflows record the one they used in the decomp file they write (``extra["preprocessing"]``,
:func:`recorded_preprocessing` reads it back), so that later commands read data for that model
the same way unless told otherwise. :func:`parse_preprocessing` reads the command line's options.

- ``mean``, ``std``: per-channel normalization of pixels in [0, 1]; None: the data's own
  (ImageNet's for an ImageFolder, Fashion-MNIST's for Fashion-MNIST). One value serves every
  channel; three values for a grey model are averaged, as ImageNet's are.
- ``resize`` (ImageFolder only; Fashion-MNIST is always padded to the model's size):
  ``"squash"`` resizes every image to (H, W), whatever its aspect ratio; ``"crop"`` resizes it,
  keeping its aspect ratio, to cover (H, W) / ``crop_fraction`` and takes the centre (H, W), the
  ImageNet evaluation convention (224 of 256 at the default 0.875).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from decomp.checkpoint import model_meta

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NORMALIZATIONS = {
    "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
    "unit": ((0.0,), (1.0,)),
    "minus-one-one": ((0.5,), (0.5,)),
}
"""``--normalize`` shorthands: ImageNet's statistics, pixels in [0, 1], pixels in [-1, 1]."""
RESIZES = ("squash", "crop")
CROP_FRACTION = 0.875
RECORD_KEY = "preprocessing"
"""Where a decomp file's extra records the preprocessing its model was made with."""


def _floats(values: Sequence[float] | None, name: str) -> tuple[float, ...] | None:
    if values is None:
        return None
    numbers = tuple(float(v) for v in values)
    if not numbers:
        raise ValueError(f"{name} needs at least one value")
    return numbers


@dataclass(frozen=True)
class Preprocessing:
    """Normalization and resizing of images (see the module docstring).

    Attributes:
        mean: Per-channel mean of pixels in [0, 1]; None: the data's own.
        std: Per-channel std (> 0); None: the data's own.
        resize: ``"squash"`` or ``"crop"``.
        crop_fraction: With ``"crop"``: the share of the resized image kept, in (0, 1].
    """

    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    resize: str = "squash"
    crop_fraction: float = CROP_FRACTION

    def __post_init__(self) -> None:
        object.__setattr__(self, "mean", _floats(self.mean, "mean"))
        object.__setattr__(self, "std", _floats(self.std, "std"))
        if self.std is not None and min(self.std) <= 0:
            raise ValueError(f"std must be > 0; got {list(self.std)}")
        if self.resize not in RESIZES:
            raise ValueError(f"unknown resize {self.resize!r}; expected one of {sorted(RESIZES)}")
        if not 0 < self.crop_fraction <= 1:
            raise ValueError(f"crop_fraction must be in (0, 1]; got {self.crop_fraction}")

    def for_channels(
        self, channels: int, default: tuple[Sequence[float], Sequence[float]]
    ) -> Preprocessing:
        """This preprocessing with one mean and std per channel; ``default`` fills what is None.

        Raises:
            ValueError: a mean or std that has neither 1 nor ``channels`` values (nor 3 for a
                grey model).
        """
        mean = _per_channel(default[0] if self.mean is None else self.mean, channels, "mean")
        std = _per_channel(default[1] if self.std is None else self.std, channels, "std")
        return dataclasses.replace(self, mean=mean, std=std)

    def to_dict(self) -> dict[str, Any]:
        """Plain data, as a decomp file records it."""
        return {
            "mean": None if self.mean is None else list(self.mean),
            "std": None if self.std is None else list(self.std),
            "resize": self.resize,
            "crop_fraction": self.crop_fraction,
        }

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> Preprocessing:
        """The inverse of :meth:`to_dict` (keys it does not know are ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in record.items() if k in names})


def _per_channel(values: Sequence[float], channels: int, name: str) -> tuple[float, ...]:
    values = tuple(values)
    if len(values) == channels:
        return values
    if len(values) == 1:
        return values * channels
    if len(values) == 3 and channels == 1:
        return (sum(values) / 3,)
    raise ValueError(
        f"{name} has {len(values)} values {list(values)} for a model with {channels} input "
        f"channels; give 1 or {channels}"
    )


def recorded_preprocessing(model: nn.Module) -> Preprocessing | None:
    """The preprocessing the decomp file ``model`` was loaded from records, or None."""
    record = (model_meta(model).get("extra") or {}).get(RECORD_KEY)
    return None if record is None else Preprocessing.from_dict(record)


def _parse_floats(text: str, option: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in text.split(","))
    except ValueError:
        raise ValueError(
            f"{option} {text!r} is not a comma-separated list of numbers, e.g. 0.5,0.5,0.5"
        ) from None


def _parse_resize(text: str) -> dict[str, Any]:
    name, _, fraction = text.partition(":")
    if name != "crop" and fraction:
        raise ValueError(f"--resize {text!r}: only crop takes a fraction (crop:0.875)")
    if not fraction:
        return {"resize": name}
    try:
        return {"resize": name, "crop_fraction": float(fraction)}
    except ValueError:
        raise ValueError(f"--resize {text!r}: the crop fraction is not a number") from None


def parse_preprocessing(
    normalize: str | None = None,
    mean: str | None = None,
    std: str | None = None,
    resize: str | None = None,
    base: Preprocessing | None = None,
) -> Preprocessing | None:
    """The command line's preprocessing options over ``base`` (what the model records).

    Args:
        normalize: ``--normalize``: a name of :data:`NORMALIZATIONS`.
        mean: ``--mean``: comma-separated numbers, e.g. ``"0.5,0.5,0.5"``.
        std: ``--std``: the same.
        resize: ``--resize``: ``squash``, ``crop`` or ``crop:FRACTION``.
        base: what the options change; default :class:`Preprocessing`'s defaults.

    Returns:
        ``base`` with the given options applied; ``base`` itself (possibly None) when none are.

    Raises:
        ValueError: a value that does not parse, or ``normalize`` with ``mean`` or ``std``.
    """
    given: dict[str, Any] = {}
    if normalize is not None:
        if mean is not None or std is not None:
            raise ValueError("give --normalize or --mean/--std, not both")
        if normalize not in NORMALIZATIONS:
            raise ValueError(
                f"unknown --normalize {normalize!r}; expected one of {sorted(NORMALIZATIONS)}"
            )
        given["mean"], given["std"] = NORMALIZATIONS[normalize]
    if mean is not None:
        given["mean"] = _parse_floats(mean, "--mean")
    if std is not None:
        given["std"] = _parse_floats(std, "--std")
    if resize is not None:
        given.update(_parse_resize(resize))
    if not given:
        return base
    return dataclasses.replace(base or Preprocessing(), **given)
