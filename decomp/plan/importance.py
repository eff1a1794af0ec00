"""How much each layer's approximation error costs the model's outputs, measured on data.

The rank allocator (:mod:`rank_selection.budget`) estimates each layer's error from its spectra
alone, as a share of the kernel's energy. The same share costs more in some layers than in
others: a stem conv that every later layer depends on, or a small head, is worth more than one
of many wide 3x3 convs deep in the net. So, as in the per-layer sensitivity analysis of
compression tools (AIMET's "greedy compression-ratio selection", for example), each layer is
probed on a few batches: its kernel alone is replaced by a low-rank projection, and the mean
KL divergence of the model's softmax outputs from the original's is measured. Dividing that
damage by the spectral error of the same projection gives the layer's weight: the output damage
per unit of estimated error, which the allocator multiplies into the layer's error curve.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

from decomp._utils import batch_images, model_device, training_flags

logger = logging.getLogger(__name__)


def take_batches(data: Iterable, batches: int, device: torch.device) -> list[Tensor]:
    """The images of the first ``batches`` batches of ``data`` (``images`` or ``(images, ...)``).

    Raises:
        ValueError: ``batches`` < 1, or ``data`` yields nothing.
    """
    if batches < 1:
        raise ValueError(f"batches must be >= 1; got {batches}")
    images = [batch_images(b).to(device) for b in itertools.islice(data, batches)]
    if not images:
        raise ValueError("the importance data yielded no batches")
    return images


@torch.no_grad()
def output_damage(
    model: nn.Module,
    layers: Sequence[nn.Module],
    probes: Sequence[Tensor],
    data: Iterable,
    batches: int = 4,
) -> list[float]:
    """Mean KL(original || probed) of the softmax outputs, swapping one layer's weight at a time.

    The model runs in eval mode and is left exactly as it was: each probe weight is copied in,
    the batches are run, and the original weight is copied back (also on an error); the training
    flags are restored.

    Args:
        model: a classifier returning logits.
        layers: modules of ``model`` with a ``weight``.
        probes: for each layer, a tensor of its weight's shape to try in its place.
        data: yields images or ``(images, labels)`` batches.
        batches: how many batches to use (fewer if ``data`` is shorter).

    Returns:
        One non-negative number per layer, in nats, in the order given.
    """
    device = model_device(model)
    with training_flags(model, train=False):
        images = take_batches(data, batches, device)
        reference = [torch.log_softmax(model(x).float(), dim=-1) for x in images]
        damage = []
        for layer, probe in zip(layers, probes, strict=True):
            saved = layer.weight.detach().clone()
            try:
                layer.weight.copy_(probe)
                kl = sum(
                    nn.functional.kl_div(
                        torch.log_softmax(model(x).float(), dim=-1),
                        ref,
                        log_target=True,
                        reduction="sum",
                    )
                    for x, ref in zip(images, reference, strict=True)
                )
            finally:
                layer.weight.copy_(saved)
            damage.append(max(0.0, float(kl)) / sum(len(x) for x in images))
    logger.info("output damage of %d layers over %d batches", len(damage), len(images))
    return damage
