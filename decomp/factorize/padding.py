"""Zero padding that a conv subclass did inside its own forward, carried over explicitly.

Ports of TensorFlow models (EfficientNet, MobileNet, MnasNet...) subclass nn.Conv2d to pad the
way TensorFlow's "SAME" does: the total padding depends on the input size and the stride, and
an odd total puts the extra row and column at the bottom and right, which ``nn.Conv2d``'s
symmetric ``padding`` cannot express. Some compute it in ``forward`` for each input (dynamic,
like timm's ``Conv2dSame``), some once for a fixed image size (static, a ``nn.ZeroPad2d``). A
factorized replacement is made of plain convs, so the padding goes in front of it as a module
of its own: :class:`SamePad2d` (dynamic) or ``nn.ZeroPad2d`` (static), inside :class:`Padded`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

Pads = tuple[int, int, int, int]
"""(left, right, top, bottom), the order of ``F.pad`` and ``nn.ZeroPad2d``."""


def same_pads(
    size: Sequence[int], kernel: Sequence[int], stride: Sequence[int], dilation: Sequence[int]
) -> Pads:
    """TensorFlow "SAME" padding of an input of spatial ``size`` (H, W): the output has
    ceil(size / stride) pixels per axis, the odd pixel of padding goes last."""
    pads = []
    for i, k, s, d in zip(size, kernel, stride, dilation, strict=True):
        total = max((-(-i // s) - 1) * s + (k - 1) * d + 1 - i, 0)
        pads.append((total // 2, total - total // 2))
    (top, bottom), (left, right) = pads
    return left, right, top, bottom


class SamePad2d(nn.Module):
    """TensorFlow "SAME" zero padding for the input at hand (see :func:`same_pads`)."""

    def __init__(
        self, kernel_size: Sequence[int], stride: Sequence[int], dilation: Sequence[int]
    ) -> None:
        super().__init__()
        self.kernel_size, self.stride = tuple(kernel_size), tuple(stride)
        self.dilation = tuple(dilation)

    def forward(self, x: Tensor) -> Tensor:
        return F.pad(x, same_pads(x.shape[-2:], self.kernel_size, self.stride, self.dilation))

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, dilation={self.dilation}"


class Padded(nn.Sequential):
    """A factorized layer behind the zero padding its original did itself: children pad, body."""

    def __init__(self, pad: nn.Module, body: nn.Module) -> None:
        super().__init__()
        self.pad, self.body = pad, body


def pad_module(pad: str | Sequence[int], conv: nn.Conv2d) -> nn.Module:
    """The module for a plan's ``pad`` entry: "same" (dynamic) or static (left, right, top,
    bottom) pads."""
    if pad == "same":
        return SamePad2d(conv.kernel_size, conv.stride, conv.dilation)
    left, right, top, bottom = (int(p) for p in pad)
    return nn.ZeroPad2d((left, right, top, bottom))
