"""Batch transforms of uint8 image tensors ``(N, C, H, W)``: fit to a size, flip, shift."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


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


def shift_pad(size: Sequence[int]) -> int:
    """Augmentation shift in pixels: 2 up to 32 px inputs, 4 above."""
    return 2 if min(size) <= 32 else 4
