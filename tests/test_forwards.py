"""Conv subclasses with their own forward: carried over when decomp can reproduce them (same
padding, static or dynamic), left alone and explained otherwise."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import decomp
from decomp.factorize.padding import Padded, SamePad2d, same_pads
from decomp.metrics import count_macs_competition, uncounted_layers
from decomp.plan import Skip, trace_calls

SIZE = (3, 15, 15)  # odd, so that stride-2 "same" padding is asymmetric


class TimmStyleConv2dSame(nn.Conv2d):
    """TensorFlow "SAME" padding computed in forward for each input, as timm's Conv2dSame."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, padding=0, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ih, iw = x.shape[-2:]
        kh, kw = self.weight.shape[-2:]
        pad_h = max((math.ceil(ih / self.stride[0]) - 1) * self.stride[0] + kh - ih, 0)
        pad_w = max((math.ceil(iw / self.stride[1]) - 1) * self.stride[1] + kw - iw, 0)
        x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class StaticSameConv2d(nn.Conv2d):
    """Padding fixed at construction for one image size, as EfficientNet ports do."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int = 1, image: int = 15):
        super().__init__(in_ch, out_ch, kernel, stride, bias=False)
        total = max((math.ceil(image / stride) - 1) * stride + kernel - image, 0)
        self.static_padding = nn.ZeroPad2d((total // 2, total - total // 2) * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(self.static_padding(x), self.weight, self.bias, self.stride, self.padding)


class StdConv2d(nn.Conv2d):
    """Weight standardization in forward: not something decomp carries over."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
        return self._conv_forward(x, w, self.bias)


class AttributesOnly(nn.Conv2d):
    """A subclass that only adds an attribute: its forward is nn.Conv2d's."""

    tag = "mine"


class SameNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = TimmStyleConv2dSame(3, 16, 3, stride=2, bias=True)
        self.block = StaticSameConv2d(16, 24, 5, stride=2, image=8)
        self.same1 = TimmStyleConv2dSame(24, 24, 3)
        self.point = TimmStyleConv2dSame(24, 32, 1, stride=2)
        self.std = StdConv2d(32, 32, 3, padding=1)
        self.plain = AttributesOnly(32, 32, 3, padding=1)
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        x = torch.relu(self.same1(torch.relu(self.block(x))))
        x = self.plain(self.std(self.point(x)))
        return self.head(x.mean((2, 3)))


def same_net() -> SameNet:
    torch.manual_seed(0)
    return SameNet().eval()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_same_pads_follow_tensorflow() -> None:
    assert same_pads((15, 15), (3, 3), (2, 2), (1, 1)) == (1, 1, 1, 1)
    assert same_pads((16, 16), (3, 3), (2, 2), (1, 1)) == (0, 1, 0, 1)  # the odd pixel last
    assert same_pads((8, 9), (5, 5), (2, 2), (1, 1)) == (2, 2, 1, 2)  # (left, right, top, bottom)
    assert same_pads((10, 10), (3, 3), (1, 1), (2, 2)) == (2, 2, 2, 2)  # dilation


@pytest.mark.parametrize("method", ["tucker", "auto"])
def test_full_rank_reproduces_same_padding_convs(method: str) -> None:
    model = same_net()
    p = decomp.plan(model, method, "ratio:1.0", SIZE, force=True)
    pads = {lp.name: lp.pad for lp in p.layers}
    assert pads["stem"] == pads["same1"] == pads["point"] == "same"
    assert pads["block"] == [1, 2, 1, 2] and pads["plain"] is None
    compressed = decomp.apply(model, p)
    assert isinstance(compressed.stem, Padded) and isinstance(compressed.stem.pad, SamePad2d)
    for size in (SIZE, (3, 16, 16), (3, 21, 18)):  # "same" is per input; static stays fixed
        x = torch.randn(2, *size)
        with torch.no_grad():
            assert rel(compressed(x), model(x)) < 1e-5, size


def test_svd_reproduces_a_same_padding_pointwise_conv() -> None:
    model = same_net()
    p = decomp.plan(model, "svd", "ratio:1.0", SIZE, force=True)
    assert [lp.name for lp in p.decomposed] == ["point", "head"]
    x = torch.randn(2, *SIZE)
    with torch.no_grad():
        assert rel(decomp.apply(model, p)(x), model(x)) < 1e-5


def test_unknown_forward_is_skipped_with_a_reason() -> None:
    p = decomp.plan(same_net(), "tucker", "ratio:0.5", SIZE, force=True)
    std = next(lp for lp in p.layers if lp.name == "std")
    assert std.method is None and std.skip is Skip.CUSTOM_FORWARD
    assert "StdConv2d has its own forward" in std.reason and std.short_reason == "custom forward"


def test_plan_costs_match_thop_on_padded_layers() -> None:
    model = same_net()
    for method, rank in (("tucker", "ratio:0.5"), ("cp", 4), ("auto", "ratio:0.5")):
        p = decomp.plan(model, method, rank, SIZE, force=True)
        compressed = decomp.apply(model, p)
        assert decomp.count_macs(compressed, SIZE) == p.macs_after, method
        assert decomp.count_params(compressed) == p.params_after, method


def test_padded_layers_save_and_load(tmp_path: Path) -> None:
    model = same_net()
    compressed = decomp.decompose(model, "auto", "ratio:0.5", SIZE, force=True)
    path = decomp.save(compressed, tmp_path / "same.pt", arch="tests.test_forwards:same_net")
    loaded = decomp.load(path)
    x = torch.randn(2, *SIZE)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), compressed(x))


def test_both_counters_see_subclass_convs() -> None:
    model = same_net()
    p = decomp.plan(model, "tucker", "ratio:1.0", SIZE, force=True)
    dense = sum(lp.macs_before for lp in p.layers)  # the closed form of every conv and linear
    assert decomp.count_macs(model, SIZE) == dense == p.model_macs
    calls = trace_calls(model, SIZE)
    biases = sum(math.prod(c.out[1:]) for m, cs in calls.items() if m.bias is not None for c in cs)
    assert count_macs_competition(model, SIZE) == dense + biases  # ptflops adds the biases
    assert uncounted_layers(model) == {"thop": [], "ptflops": []}


def test_a_counter_gap_is_named() -> None:
    class Scaled(nn.Module):  # parameters, but no counter knows what it computes
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.ones(3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.scale[:, None, None]

    model = nn.Sequential(Scaled(), nn.Conv2d(3, 4, 3))
    assert uncounted_layers(model) == {"thop": ["Scaled"], "ptflops": ["Scaled"]}
