"""decomp.data.transforms: per-image flips and shifts, padding or resizing to the model's size."""

from __future__ import annotations

import torch

from decomp.data.transforms import fit_images, random_hflip, random_shift


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
