"""Tests of decomp.optim: the distillation loss and the learning-rate schedules."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from decomp.optim import distillation_loss, lr_factor


def test_distillation_loss_formula() -> None:
    gen = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 5, generator=gen), torch.randn(6, 5, generator=gen)
    y = torch.randint(0, 5, (6,), generator=gen)
    ce = F.cross_entropy(s, y)
    assert torch.allclose(distillation_loss(s, y), ce)
    assert torch.allclose(distillation_loss(s, y, t, alpha=0.0), ce)
    temp = 3.0
    p_t = (t / temp).softmax(1)
    kl = (p_t * (p_t.log() - (s / temp).log_softmax(1))).sum(1).mean()
    assert torch.allclose(distillation_loss(s, y, t, alpha=1.0, temperature=temp), temp**2 * kl)
    mixed = distillation_loss(s, y, t, alpha=0.25, temperature=temp)
    assert torch.allclose(mixed, 0.75 * ce + 0.25 * temp**2 * kl)
    assert distillation_loss(s, y, s.clone(), alpha=1.0).abs() < 1e-6


def test_lr_schedules() -> None:
    cosine = [lr_factor("cosine", i, 100, warmup_steps=10) for i in range(100)]
    assert cosine[0] < cosine[5] < cosine[10] == 1.0 > cosine[50] > cosine[99] >= 0
    onecycle = [lr_factor("onecycle", i, 100) for i in range(100)]
    assert onecycle[0] == pytest.approx(1 / 25) and max(onecycle) == pytest.approx(1.0)
    assert onecycle[99] < 1e-3
    assert lr_factor("constant", 37, 100) == 1.0
