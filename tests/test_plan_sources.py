"""Source adapters: a plan may name a module that is not a plain layer but computes one."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from decomp.factorize import TuckerConv2d
from decomp.plan import LayerPlan, Plan, apply
from decomp.plan.model import Skip

apply_module = sys.modules["decomp.plan.apply"]  # the module, which decomp.plan.apply shadows


class ScaledConv(nn.Module):
    """Not an nn.Conv2d, but computes one: conv2d(x, scale * weight)."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.raw = nn.Parameter(torch.randn(c_out, c_in, 3, 3))
        self.scale = nn.Parameter(torch.tensor(0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.scale * self.raw, padding=1)


@torch.no_grad()
def plain_scaled(module: nn.Module) -> nn.Module | None:
    if not isinstance(module, ScaledConv):
        return None
    c_out, c_in = module.raw.shape[:2]
    conv = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
    conv.weight.copy_(module.scale * module.raw)
    return conv


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(ScaledConv(4, 6), nn.ReLU(), ScaledConv(6, 5)).eval()


def _plan() -> Plan:
    layers = [
        LayerPlan("0", "conv", [6, 4, 3, 3], "tucker", [6, 4]),
        LayerPlan("2", "conv", [5, 6, 3, 3], skip=Skip.LAYER_KIND, reason="kept: dense"),
        LayerPlan("gone", "conv", [1, 1, 3, 3], skip=Skip.NOT_CALLED, reason="not in this model"),
    ]
    return Plan("tucker", "exact", [4, 8, 8], layers)


@pytest.fixture
def adapter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(apply_module, "_SOURCES", [])
    assert apply_module.register_source(plain_scaled) is plain_scaled
    apply_module.register_source(plain_scaled)
    assert apply_module._SOURCES == [plain_scaled]


def test_a_plan_names_modules_an_adapter_knows(adapter: None) -> None:
    net, x = _net(), torch.randn(2, 4, 8, 8)
    out = apply(net, _plan())  # full Tucker ranks: exact
    assert isinstance(out[0], TuckerConv2d)
    assert type(out[2]) is nn.Conv2d  # the skipped layer became the plain layer it computes
    assert isinstance(net[0], ScaledConv)  # on a copy
    torch.testing.assert_close(out(x), net(x), rtol=1e-4, atol=1e-5)
    rebuilt = apply(_net(), _plan(), init="structure")
    assert [type(m) for m in rebuilt] == [type(m) for m in out]
    rebuilt.load_state_dict(out.state_dict())
    assert torch.equal(rebuilt(x), out(x))


def test_without_an_adapter_the_plan_does_not_fit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(apply_module, "_SOURCES", [])
    with pytest.raises(ValueError, match="0: the plan expects Conv2d, the model has ScaledConv"):
        apply(_net(), _plan())
