"""decomp.data.preprocessing and what it changes: normalization, squash vs centre crop, the
command line's parser, the record; calibration_data on folders with and without val/."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from decomp.checkpoint import load, save
from decomp.data import (
    Preprocessing,
    calibration_data,
    load_data,
    parse_preprocessing,
    recorded_preprocessing,
)
from decomp.data.image_folder import IMAGENET_MEAN
from decomp.data.preprocessing import RECORD_KEY
from tests.conftest import tiny_net

SIZE = (3, 8, 8)
UNIT = Preprocessing(mean=(0.0,), std=(1.0,))


def banded_folder(root: Path, per_class: int = 2) -> Path:
    """30x10 RGB images (w x h): black in the middle 10 columns, white at the sides."""
    pixels = np.full((10, 30, 3), 255, dtype=np.uint8)
    pixels[:, 10:20] = 0
    for name in ("a", "b"):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


def first_batch(loader: torch.utils.data.DataLoader) -> torch.Tensor:
    return next(iter(loader))[0]


def test_minus_one_one_puts_pixels_in_that_range(tmp_path):
    root = banded_folder(tmp_path)
    prep = parse_preprocessing(normalize="minus-one-one")
    bundle = load_data(str(root), SIZE, val_split=2, workers=0, preprocessing=prep)
    x = first_batch(bundle.val_loader)
    assert -1 <= x.min() < -0.9 and x.max() == pytest.approx(1.0, abs=1e-3)
    assert bundle.mean == (0.5, 0.5, 0.5) and bundle.preprocessing.std == (0.5, 0.5, 0.5)
    default = load_data(str(root), SIZE, val_split=2, workers=0)
    assert default.mean == IMAGENET_MEAN and default.preprocessing.resize == "squash"
    assert first_batch(default.val_loader).max() > 2  # (1 - 0.406) / 0.225


def test_centre_crop_keeps_the_middle_and_squash_the_whole_width(tmp_path):
    root = banded_folder(tmp_path)
    squashed = calibration_data(str(root), SIZE, UNIT, workers=0)
    cropped = calibration_data(
        str(root), SIZE, Preprocessing((0.0,), (1.0,), "crop", 1.0), workers=0
    )
    squash, crop = first_batch(squashed.loader), first_batch(cropped.loader)
    assert squash.shape == crop.shape == (4, *SIZE)
    assert squash.mean() == pytest.approx(2 / 3, abs=0.05)  # two white thirds of the width
    assert crop.max() < 0.1  # the centre 10x10 is black
    # the default fraction keeps 7/8 of a 10x10 centre scaled to cover 9.1 px: still black
    default_crop = parse_preprocessing(resize="crop", base=UNIT)
    assert default_crop.crop_fraction == 0.875
    inner = calibration_data(str(root), SIZE, default_crop, workers=0)
    assert first_batch(inner.loader).max() < 0.1


def test_grey_models_average_three_values_and_one_value_serves_every_channel():
    assert UNIT.for_channels(3, ((9,), (9,))).mean == (0.0, 0.0, 0.0)
    grey = Preprocessing(mean=(0.3, 0.6, 0.9), std=(1.0,)).for_channels(1, ((0,), (1,)))
    assert grey.mean == pytest.approx((0.6,)) and grey.std == (1.0,)
    assert Preprocessing().for_channels(1, ((0.25,), (0.5,))).mean == (0.25,)
    with pytest.raises(ValueError, match="mean has 2 values .* 3 input channels; give 1 or 3"):
        Preprocessing(mean=(0.1, 0.2)).for_channels(3, ((0,), (1,)))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"normalize": "imagenet", "mean": "0.5"}, "give --normalize or --mean/--std, not both"),
        ({"normalize": "bogus"}, "expected one of ['imagenet', 'minus-one-one', 'unit']"),
        ({"mean": "0.5,x"}, "--mean '0.5,x' is not a comma-separated list of numbers"),
        ({"std": "0.5,0"}, "std must be > 0"),
        ({"resize": "stretch"}, "unknown resize 'stretch'; expected one of ['crop', 'squash']"),
        ({"resize": "crop:1.5"}, "crop_fraction must be in (0, 1]"),
        ({"resize": "crop:big"}, "the crop fraction is not a number"),
        ({"resize": "squash:0.5"}, "only crop takes a fraction"),
    ],
)
def test_bad_options_say_what_is_accepted(options, message):
    with pytest.raises(ValueError) as info:
        parse_preprocessing(**options)
    assert message in str(info.value)


def test_options_change_only_what_they_name():
    recorded = Preprocessing(mean=(0.5,), std=(0.5,), resize="crop", crop_fraction=0.9)
    assert parse_preprocessing(base=recorded) is recorded and parse_preprocessing() is None
    assert parse_preprocessing(resize="squash", base=recorded) == Preprocessing(
        (0.5,), (0.5,), "squash", 0.9
    )
    assert parse_preprocessing(mean="0.1,0.2,0.3", base=recorded).mean == (0.1, 0.2, 0.3)
    assert parse_preprocessing(resize="crop:0.8").crop_fraction == 0.8


def test_the_record_round_trips_through_a_decomp_file(tmp_path):
    prep = Preprocessing(mean=(0.5, 0.5, 0.5), std=(0.25,) * 3, resize="crop")
    assert Preprocessing.from_dict({**prep.to_dict(), "later": 1}) == prep
    path = save(tiny_net(), tmp_path / "m.pt", arch="tests.conftest:tiny_net", input_size=SIZE)
    assert recorded_preprocessing(load(path)) is None
    path = save(load(path), tmp_path / "p.pt", extra={RECORD_KEY: prep.to_dict()})
    assert recorded_preprocessing(load(path)) == prep


def test_calibration_data_needs_no_val_folder(digits, tmp_path):
    full = calibration_data(str(digits), (1, 8, 8), batch_size=64, workers=0)
    assert full.images == 160 and len(full.loader) == 3  # train/ only, not val/ or test/
    flat = calibration_data(str(digits / "val"), (1, 8, 8), batch_size=16, workers=0, seed=1)
    assert flat.images == 40 and flat.preprocessing.mean == (sum(IMAGENET_MEAN) / 3,)
    first, again = list(flat.loader), list(flat.loader)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, again, strict=True))  # no augment
    labels = torch.cat([y for _, y in first])
    assert not torch.equal(labels, labels.sort().values)  # a seeded shuffle, not folder order
    other = calibration_data(str(digits / "val"), (1, 8, 8), batch_size=16, workers=0, seed=2)
    assert not torch.equal(labels, torch.cat([y for _, y in other.loader]))
    (tmp_path / "val" / "a").mkdir(parents=True)
    with pytest.raises(ValueError, match="has a val/ folder but no train/ folder"):
        calibration_data(str(tmp_path), (1, 8, 8), workers=0)
    with pytest.raises(FileNotFoundError, match="neither 'fashion-mnist"):
        calibration_data(str(tmp_path / "absent"), (1, 8, 8), workers=0)
