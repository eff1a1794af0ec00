"""Conv and linear subclasses: a layer is factorized only when decomp reproduces its forward.

A factorized layer is made of plain ``nn.Conv2d`` / ``nn.Linear`` modules, so anything extra a
subclass does in its own ``forward`` would be lost without a word (ports of TensorFlow models pad
inside ``forward``; other subclasses standardize their weights, quantize, mask...). So:

- a layer whose type does not override the forward of ``nn.Conv2d`` / ``nn.Linear`` is plain;
- a conv subclass with its own forward is recognised by what it computes, not by its name: on a
  random input of the traced shape, and of a shape one pixel larger, its output must equal a plain
  convolution behind TensorFlow "SAME" padding computed for each input (``pad = "same"``) or
  behind the fixed padding of a ``nn.ZeroPad2d`` / zero ``nn.ConstantPad2d`` it holds (static
  pads). That padding is then carried over in front of the factorized module
  (:mod:`decomp.factorize.padding`);
- anything else is left as it is, and the plan says why.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from decomp.factorize.padding import same_pads
from decomp.factorize.registry import Call

Pad = str | list[int] | None
"""A plan's ``pad`` entry: None (plain forward), "same" (dynamic) or static [l, r, t, b]."""

_TOLERANCE = 1e-5  # relative output error of a recognised forward (float32 rounding is ~1e-7)


def has_plain_forward(layer: nn.Module) -> bool:
    """Whether ``layer`` runs the forward of the plain layer type it derives from."""
    for base in (nn.Conv2d, nn.Linear):
        if isinstance(layer, base):
            kind = type(layer)
            same = kind.forward is base.forward
            if base is nn.Conv2d:
                same = same and kind._conv_forward is nn.Conv2d._conv_forward
            return same
    return False


def recognise(layer: nn.Module, call: Call) -> tuple[Pad, str]:
    """The padding that carries ``layer``'s forward over to plain layers, or why there is none.

    Returns:
        ``(pad, "")`` when decomp reproduces the forward (``pad`` None for a plain one), else
        ``(None, reason)``.
    """
    if has_plain_forward(layer):
        return None, ""
    name = type(layer).__name__
    if not isinstance(layer, nn.Conv2d):
        return None, f"{name} has its own forward, which plain nn.Linear layers would not keep"
    for pad in _candidates(layer):
        if all(_reproduces(layer, pad, size) for size in _probe_sizes(call)):
            return pad, ""
    return None, (
        f"{name} has its own forward, and it is neither a plain convolution nor one behind "
        "'same' or fixed zero padding; left as it is"
    )


def _candidates(layer: nn.Conv2d) -> list[Pad]:
    """Static pads of a zero-padding module the layer holds, then dynamic "same" padding."""
    found: list[Pad] = []
    for child in layer.modules():
        if isinstance(child, nn.ZeroPad2d | nn.ConstantPad2d) and child.value == 0:
            found.append([int(p) for p in child.padding])
    return [*found, "same"]


def _probe_sizes(call: Call) -> list[tuple[int, ...]]:
    """The traced input shape, and one a pixel larger (which tells static from dynamic)."""
    n, c, h, w = call.inp
    return [(1, c, h, w), (1, c, h + 1, w + 1)]


@torch.no_grad()
def _reproduces(layer: nn.Conv2d, pad: Pad, size: tuple[int, ...]) -> bool:
    w = layer.weight
    x = torch.randn(size, generator=torch.Generator().manual_seed(0)).to(w.device, w.dtype)
    try:
        out = layer(x)
    except Exception:  # a forward that cannot take the probe: not one we know
        return False
    pads = _pads(pad, layer, size[-2:])
    ref = F.conv2d(
        F.pad(x, pads), w, layer.bias, layer.stride, layer.padding, layer.dilation, layer.groups
    )
    if not isinstance(out, torch.Tensor) or out.shape != ref.shape:
        return False
    return bool((out - ref).norm() <= _TOLERANCE * ref.norm().clamp_min(1e-12))


def _pads(pad: Pad, layer: nn.Conv2d, size: Sequence[int]) -> tuple[int, int, int, int]:
    if pad == "same":
        return same_pads(size, layer.kernel_size, layer.stride, layer.dilation)
    return tuple(pad)  # type: ignore[return-value]


def padded_calls(layer: nn.Module, pad: Pad, calls: Sequence[Call]) -> list[Call]:
    """The calls as the plain conv behind ``pad`` sees them: inputs grown by the padding."""
    if pad is None:
        return list(calls)
    out = []
    for c in calls:
        left, right, top, bottom = _pads(pad, layer, c.inp[-2:])
        inp = (*c.inp[:-2], c.inp[-2] + top + bottom, c.inp[-1] + left + right)
        out.append(Call(inp, c.out))
    return out
