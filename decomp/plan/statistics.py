"""What calibration data says about each layer's inputs, for output-aware factorization.

One pass over a few batches, in eval mode, with a forward hook on every layer to fit: the
second moment E[x x^T] of its input channels (every pixel of every image counts as a sample;
for a linear layer every row). Fitting ``W root(E[x x^T])`` instead of ``W`` makes a
factorization fit the layer's outputs on that data rather than its weights
(:class:`~decomp.factorize.base.Whitening`).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

from decomp._utils import batch_images, model_device, training_flags
from decomp.factorize.base import Whitening

logger = logging.getLogger(__name__)

FIT_BATCHES = 8
"""Batches of calibration data that an output-aware plan measures the inputs' statistics on."""
MAX_FEATURES = 4096
"""Layers with more input features are fitted on their weights: the second moment would cost
features^2 numbers (vgg16's 25088-input classifier: 5 GB)."""


def _first_layer(module: nn.Module) -> nn.Module:
    """The layer that sees a module's input: itself, or a factorized chain's first link."""
    while isinstance(module, nn.Sequential) and len(module):
        module = module[0]
    return module


def input_features(layer: nn.Module) -> int:
    """The size of the vectors a layer's weight multiplies: Cin for a conv, in for a linear."""
    return layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels


@torch.no_grad()
def input_moments(
    model: nn.Module, layers: Sequence[nn.Module], data: Iterable, batches: int
) -> tuple[dict[nn.Module, Tensor], int, int]:
    """The second moment of each layer's input features over ``batches`` batches of ``data``.

    Args:
        model: run in eval mode on the batches (its flags are restored).
        layers: modules of ``model`` (Conv2d or Linear), each with at most :data:`MAX_FEATURES`
            input features.
        data: yields images or ``(images, labels)`` batches.
        batches: how many batches to use (fewer if ``data`` is shorter).

    Returns:
        ``({layer: E[x x^T] (features x features, float64)}, images seen, batches seen)``.

    Raises:
        ValueError: ``batches`` < 1, or the data yields nothing.
    """
    if batches < 1:
        raise ValueError(f"batches must be >= 1; got {batches}")
    sums: dict[nn.Module, Tensor] = {}
    counts: dict[nn.Module, int] = dict.fromkeys(layers, 0)

    def hook(module: nn.Module, args: tuple) -> None:
        x = args[0].detach()
        if isinstance(_first_layer(module), nn.Conv2d):  # a factorized conv is a Sequential
            rows = x.movedim(1, -1).reshape(-1, x.shape[1]).double()
        else:
            rows = x.reshape(-1, x.shape[-1]).double()
        sums[module] = sums.get(module, 0) + rows.T @ rows
        counts[module] += len(rows)

    handles = [layer.register_forward_pre_hook(hook) for layer in layers]
    device, images, seen = model_device(model), 0, 0
    try:
        with training_flags(model, train=False):
            for batch in itertools.islice(data, batches):
                x = batch_images(batch).to(device)
                model(x)
                images, seen = images + len(x), seen + 1
    finally:
        for handle in handles:
            handle.remove()
    if images == 0:
        raise ValueError("the calibration data yielded no batches")
    logger.info("input statistics of %d layers from %d images", len(layers), images)
    return {m: sums[m].cpu() / counts[m] for m in layers if counts[m]}, images, seen


def whitenings(moments: dict[nn.Module, Tensor]) -> dict[nn.Module, Whitening]:
    """The damped roots of each moment (see :meth:`Whitening.from_moment`)."""
    return {layer: Whitening.from_moment(m) for layer, m in moments.items()}
