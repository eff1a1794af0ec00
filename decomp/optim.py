"""Loss, optimiser and learning-rate schedule of a training run.

- :func:`distillation_loss`: cross-entropy blended with knowledge distillation (Hinton et al.).
- :func:`build_optimizer`: SGD (Nesterov) or AdamW, weight decay on weights only.
- :func:`lr_factor` / :func:`build_scheduler`: the per-batch ``constant``, ``cosine`` (with warm-up)
  and ``onecycle`` schedules.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from decomp._utils import check_choice

if TYPE_CHECKING:
    from decomp.train import TrainConfig

OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("constant", "cosine", "onecycle")

# one-cycle shape (as in Smith & Topin 2019 / torch's OneCycleLR defaults)
_ONECYCLE_PCT_UP = 0.3
_ONECYCLE_DIV = 25.0
_ONECYCLE_FINAL_DIV = 1e4


def distillation_loss(
    student_logits: Tensor,
    targets: Tensor,
    teacher_logits: Tensor | None = None,
    alpha: float = 0.5,
    temperature: float = 4.0,
    label_smoothing: float = 0.0,
) -> Tensor:
    """Cross-entropy, blended with knowledge distillation when teacher logits are given.

    ``loss = (1 - alpha) * CE(student, y) + alpha * T^2 * KL(softmax(t / T) || softmax(s / T))``
    (Hinton, Vinyals, Dean, "Distilling the knowledge in a neural network", 2015; the T^2 keeps the
    soft term's gradients on the scale of the hard term's).

    Args:
        student_logits: ``(N, C)``.
        targets: ``(N,)`` class indices.
        teacher_logits: ``(N, C)`` or None for plain cross-entropy.
        alpha: weight of the distillation term, in [0, 1].
        temperature: softening temperature T.
        label_smoothing: label smoothing of the cross-entropy term.

    Returns:
        The scalar loss (float32).
    """
    student_logits = student_logits.float()
    ce = F.cross_entropy(student_logits, targets, label_smoothing=label_smoothing)
    if teacher_logits is None:
        return ce
    t = temperature
    kl = F.kl_div(
        F.log_softmax(student_logits / t, dim=1),
        F.log_softmax(teacher_logits.float() / t, dim=1),
        reduction="batchmean",
        log_target=True,
    )
    return (1.0 - alpha) * ce + alpha * (t * t) * kl


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters, with weight decay on weights (ndim >= 2) only."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    if not decay and not no_decay:
        raise ValueError("the model has no trainable parameters")
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """The optimiser named by ``config.optimizer`` over the model's trainable parameters."""
    groups = _param_groups(model, config.weight_decay)
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=True)
    return torch.optim.AdamW(groups, lr=config.lr)


def lr_factor(schedule: str, step: int, total_steps: int, warmup_steps: int = 0) -> float:
    """Multiplier of the peak learning rate at optimiser step ``step`` (0-based).

    Args:
        schedule: one of :data:`SCHEDULES`.
        step: the number of optimiser steps taken so far.
        total_steps: steps of the whole run.
        warmup_steps: linear warm-up length of the cosine schedule.

    Returns:
        The factor, in (0, 1] during the run.
    """
    check_choice("schedule", schedule, SCHEDULES)
    total_steps = max(1, total_steps)
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    start, end = 1.0 / _ONECYCLE_DIV, 1.0 / (_ONECYCLE_DIV * _ONECYCLE_FINAL_DIV)
    up = max(1, round(_ONECYCLE_PCT_UP * total_steps))
    if step < up:
        return start + (1.0 - start) * 0.5 * (1.0 - math.cos(math.pi * step / up))
    progress = min(1.0, (step - up) / max(1, total_steps - up))
    return end + (1.0 - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer, config: TrainConfig, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-batch LambdaLR following :func:`lr_factor` (its state is plain data)."""
    total = config.epochs * steps_per_epoch
    warmup = round(config.warmup_epochs * steps_per_epoch)

    def factor(step: int) -> float:
        return lr_factor(config.schedule, step, total, warmup)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
