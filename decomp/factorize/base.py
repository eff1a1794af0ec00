"""Shared pieces of the factorizers: the module type they return and argument checks."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn


class Factorized(nn.Sequential):
    """A layer replaced by a chain of plain ``nn.Conv2d`` / ``nn.Linear`` modules.

    Subclasses only name the method; the forward is ``nn.Sequential``'s, so MAC counters that
    match exact types (thop, ptflops) count every child. ``ranks`` is recorded for reports and
    so that a second decomposition pass can recognise the layer and leave it alone.
    """

    method: str = ""

    def __init__(self, ranks: tuple[int, ...], **children: nn.Module) -> None:
        super().__init__()
        for name, child in children.items():
            self.add_module(name, child)
        self.ranks = tuple(int(r) for r in ranks)

    def extra_repr(self) -> str:
        return f"method={self.method}, ranks={self.ranks}"


def check_rank(rank: int, limit: int, what: str) -> int:
    """Return ``rank`` as an int if ``1 <= rank <= limit``, else raise ValueError."""
    if isinstance(rank, bool) or int(rank) != rank:
        raise TypeError(f"rank must be an integer; got {rank!r}")
    if not 1 <= rank <= limit:
        raise ValueError(f"rank {rank} out of range for {what}; expected 1 <= rank <= {limit}")
    return int(rank)


def check_plain_conv(conv: nn.Module, method: str) -> nn.Conv2d:
    """Accept only an ungrouped ``nn.Conv2d``; explain anything else."""
    if not isinstance(conv, nn.Conv2d):
        raise TypeError(f"{method} factorizes nn.Conv2d; got {type(conv).__name__}")
    if conv.groups != 1:
        raise ValueError(
            f"{method} needs an ungrouped conv; got groups={conv.groups} "
            "(grouped and depthwise convs are left as they are)"
        )
    return conv


def conv_like(
    src: nn.Conv2d,
    in_channels: int,
    out_channels: int,
    kernel_size: tuple[int, int] = (1, 1),
    *,
    stride: tuple[int, int] | int = 1,
    padding: tuple[int, int] | int | str = 0,
    dilation: tuple[int, int] | int = 1,
    groups: int = 1,
    bias: bool = False,
    padding_mode: str = "zeros",
) -> nn.Conv2d:
    """A plain ``nn.Conv2d`` on the device and dtype of ``src``."""
    return nn.Conv2d(
        in_channels,
        out_channels,
        kernel_size,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        bias=bias,
        padding_mode=padding_mode,
        device=src.weight.device,
        dtype=src.weight.dtype,
    )


@torch.no_grad()
def copy_bias(src: nn.Module, dst: nn.Module) -> None:
    """Copy the original bias into the last factor (only when the original had one)."""
    if src.bias is not None:
        dst.bias.copy_(src.bias)


def numel(shape: Sequence[int]) -> int:
    """The number of entries of a tensor of ``shape``."""
    n = 1
    for d in shape:
        n *= d
    return n


def layer_kind(layer: nn.Module) -> str:
    """A few words for a layer's kind: "linear layer", "1x1 conv" or "kxk conv"."""
    if isinstance(layer, nn.Linear):
        return "linear layer"
    return "1x1 conv" if tuple(layer.kernel_size) == (1, 1) else "kxk conv"


def spatial_conv_only(layer: nn.Module, method: str) -> str | None:
    """None for a kxk conv; else why ``method`` (Tucker-2, CP) does not apply to ``layer``."""
    kind = layer_kind(layer)
    return None if kind == "kxk conv" else f"{kind}: {method} applies to kxk convs"


@dataclass(frozen=True)
class Whitening:
    """What an output-aware factorization knows of a layer's inputs.

    ``moment`` is the second moment E[x x^T] of the input channels (Cin x Cin, over every pixel
    of calibration data), ``root`` its square root and ``inv_root`` the inverse root, both
    damped: fitting ``W root`` instead of ``W`` in Frobenius norm fits the layer's outputs on that
    data (the response reconstruction of Zhang, Zou, He and Sun, "Accelerating very deep
    convolutional networks for classification and detection", TPAMI 38(10), 2016).
    """

    moment: Tensor
    root: Tensor
    inv_root: Tensor

    @classmethod
    def from_moment(cls, moment: Tensor, damping: float = 1e-2) -> Whitening:
        """Roots of ``moment + damping * mean(diag) * I`` (float64 eigendecomposition)."""
        m = moment.double()
        m = m + damping * m.diagonal().mean().clamp_min(1e-30) * torch.eye(len(m), dtype=m.dtype)
        values, vectors = torch.linalg.eigh(m)
        values = values.clamp_min(values[-1] * 1e-12)
        root = (vectors * values.sqrt()) @ vectors.T
        inv_root = (vectors / values.sqrt()) @ vectors.T
        return cls(moment.double(), root, inv_root)
