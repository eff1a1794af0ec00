"""Batch-norm calibration: re-estimate running statistics after decomposition, no training.

Seconds of work that recover most of the accuracy a decomposition costs: the factorized layers
change the activations every BatchNorm after them sees, so their running statistics are stale.
"""

from __future__ import annotations

import copy
import itertools
import logging
from collections.abc import Iterable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from decomp._utils import batch_images, model_device, training_flags

logger = logging.getLogger(__name__)


def has_batchnorm(model: nn.Module) -> bool:
    """Whether ``model`` has a batch-norm layer with running statistics to re-estimate."""
    return bool(_batchnorms(model))


def _batchnorms(model: nn.Module) -> list[_BatchNorm]:
    return [
        m
        for m in model.modules()
        if isinstance(m, _BatchNorm) and m.track_running_stats and m.running_mean is not None
    ]


def _forward_batches(model: nn.Module, loader: Iterable, batches: int, device: torch.device) -> int:
    seen = 0
    with torch.no_grad():
        for batch in itertools.islice(loader, batches):
            model(batch_images(batch).to(device, non_blocking=True))
            seen += 1
    return seen


def calibrate(
    model: nn.Module,
    loader: Iterable,
    batches: int = 30,
    device: torch.device | str | None = None,
) -> nn.Module:
    """Re-estimate batch-norm running statistics, without any gradient step (in place).

    Every BatchNorm (1d/2d/3d, SyncBatchNorm) has its running statistics reset and re-estimated as
    the plain average over ``batches`` batches (``momentum=None``). Only the batch-norm layers run
    in training mode; dropout and the rest stay in eval mode, so the statistics describe the
    activations seen at inference and the result is deterministic for a fixed loader order.
    Momenta and every module's training flag are restored afterwards; parameters and the buffers
    of other modules are not touched. On an error the old statistics are put back.

    Args:
        model: the network (for example just after decomposition).
        loader: yields ``(images, labels)`` or ``images``.
        batches: how many batches to average over (fewer if the loader is shorter).
        device: where to run; default the model's device (the model is moved when given).

    Returns:
        ``model`` itself.
    """
    norms = _batchnorms(model)
    if not norms:
        logger.info("no batch-norm layers; nothing to calibrate")
        return model
    if batches < 1:
        raise ValueError(f"batches must be >= 1; got {batches}")
    device = model_device(model) if device is None else torch.device(device)
    model.to(device)
    saved = [(bn, bn.momentum, copy.deepcopy(list(bn.buffers()))) for bn in norms]
    with training_flags(model, train=False):
        try:
            for bn in norms:
                bn.reset_running_stats()
                bn.momentum = None
                bn.train()
            seen = _forward_batches(model, loader, batches, device)
            if seen == 0:
                raise ValueError("the calibration loader yielded no batches")
        except BaseException:
            for bn, _, buffers in saved:
                for live, old in zip(bn.buffers(), buffers, strict=True):
                    live.copy_(old)
            raise
        finally:
            for bn, momentum, _ in saved:
                bn.momentum = momentum
    logger.info("re-estimated %d batch-norm layers over %d batches", len(norms), seen)
    return model
