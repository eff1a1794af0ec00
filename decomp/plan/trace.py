"""One traced forward pass: which layer is called where, at what shapes, and what it costs.

The shapes of every call of every conv and linear layer (batch 1, eval mode) give the
closed-form MACs of each layer before factorization here, and after it through each method's
:meth:`~decomp.factorize.registry.Method.costs`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from decomp._utils import model_device, model_dtype, training_flags
from decomp.factorize.base import numel
from decomp.factorize.registry import Call, method_of

TARGET_TYPES = (nn.Conv2d, nn.Linear)
"""The layer types a plan considers (subclasses included: the policy decides about those)."""


@torch.no_grad()
def trace_calls(model: nn.Module, input_size: Sequence[int]) -> dict[nn.Module, list[Call]]:
    """Shapes seen by every Conv2d and Linear, and every factorized module as a whole, in one
    eval-mode forward pass at batch 1.

    The model's training flags are restored afterwards.
    """
    calls: dict[nn.Module, list[Call]] = {}

    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        calls.setdefault(module, []).append(Call(tuple(args[0].shape), tuple(output.shape)))

    layers = [m for m in model.modules() if isinstance(m, TARGET_TYPES) or method_of(m)]
    handles = [m.register_forward_hook(hook) for m in layers]
    x = torch.zeros(1, *input_size, device=model_device(model), dtype=model_dtype(model))
    try:
        with training_flags(model, train=False):
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    return calls


def dense_costs(layer: nn.Module, calls: Sequence[Call]) -> tuple[int, int]:
    """(MACs as thop counts them over ``calls``, parameters) of a layer as it is."""
    params = sum(p.numel() for p in layer.parameters(recurse=False))
    if isinstance(layer, nn.Linear):
        return sum(numel(c.out) * layer.in_features for c in calls), params
    kh, kw = layer.kernel_size
    per_pixel = layer.out_channels * (layer.in_channels // layer.groups) * kh * kw
    return sum(c.out[2] * c.out[3] * per_pixel for c in calls), params
