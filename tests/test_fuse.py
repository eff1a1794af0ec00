"""decomp.fuse: batch norm folded into the conv before it, outputs unchanged."""

import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import decomp
from decomp.factorize import registry
from decomp.factorize.padding import Padded, SamePad2d
from decomp.fuse import conv_bn_pairs
from tests.conftest import tiny_net

TOL = 1e-5


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every batch norm statistics and an affine map far from the identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g))
                m.running_var.copy_(torch.rand(n, generator=g) * 2 + 0.1)
                if m.affine:
                    m.weight.copy_(torch.randn(n, generator=g))
                    m.bias.copy_(torch.randn(n, generator=g))
    return model.eval()


def relative_change(model: nn.Module, fused: nn.Module, size=(3, 16, 16)) -> float:
    x = torch.randn(4, *size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, out = model.eval()(x), fused(x)
    return float((out - ref).norm() / ref.norm())


def batch_norms(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]


def check(model: nn.Module, size=(3, 16, 16), left: int = 0) -> nn.Module:
    before = copy.deepcopy(model.state_dict())
    fused = decomp.fuse(model)
    assert relative_change(model, fused, size) < TOL
    assert len(batch_norms(fused)) == left
    assert not fused.training
    after = model.state_dict()  # the original is untouched
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in after)
    return fused


class ConvBN(nn.Module):
    def __init__(self, bias: bool, affine: bool = True) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(8, affine=affine)  # defined before the conv on purpose
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=bias)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("affine", [False, True])
def test_plain_conv_with_and_without_bias(bias, affine):
    fused = check(randomize_bn(ConvBN(bias, affine)))
    assert isinstance(fused.bn, nn.Identity) and fused.conv.bias is not None


def test_sequential_conv_bn():
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()))
    check(model)


def test_residual_net_tiny_and_resnet18():
    check(randomize_bn(tiny_net()))
    torch.manual_seed(0)
    check(randomize_bn(torchvision.models.resnet18(num_classes=10)), size=(3, 32, 32))


def test_factorized_modules_fold_into_their_last_conv():
    model = randomize_bn(tiny_net())
    compressed = decomp.decompose(model, "auto", "ratio:0.5", (3, 16, 16))
    assert isinstance(compressed.conv1, registry.get("tucker").module_types)
    fused = check(randomize_bn(compressed))
    assert isinstance(fused.bn1, nn.Identity) and fused.conv1.last.bias is not None


def test_padded_module_folds_into_its_body():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 3, stride=2, bias=False)
    body = registry.get("tucker").factorize(conv, [4, 3])
    model = randomize_bn(
        nn.Sequential(Padded(SamePad2d((3, 3), (2, 2), (1, 1)), body), nn.BatchNorm2d(8))
    )
    fused = check(model, size=(3, 15, 15))
    assert fused[0].body.last.bias is not None


class Untraceable(nn.Module):
    """Python control flow on a tensor: fx cannot trace it, the Sequential inside still folds."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8))
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        y = self.block(x)
        if y.sum() > 0:
            y = y * 2
        return self.bn(self.conv(y))


def test_untraceable_model_folds_inside_sequentials_only():
    fused = check(randomize_bn(Untraceable()), left=1)
    assert isinstance(fused.block[1], nn.Identity) and isinstance(fused.bn, nn.BatchNorm2d)


class Branching(nn.Module):
    """The conv's output feeds the batch norm and the residual: folding would change the sum."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


class Shared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn1, self.bn2 = nn.BatchNorm2d(3), nn.BatchNorm2d(3)
        self.alias = self.conv

    def forward(self, x):
        return self.bn1(self.conv(x)) + self.bn2(self.alias(x))


class NoStats(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3, track_running_stats=False)

    def forward(self, x):
        return self.bn(self.conv(x))


@pytest.mark.parametrize("cls", [Branching, Shared, NoStats])
def test_what_cannot_be_folded_is_left(cls):
    model = cls()
    if cls is not NoStats:
        randomize_bn(model)
    assert conv_bn_pairs(model.eval()) == []
    check(model, left=len(batch_norms(model)))


def test_training_model_is_fused_in_eval_mode():
    model = randomize_bn(tiny_net()).train()
    fused = decomp.fuse(model)
    assert model.training and not fused.training
    assert relative_change(copy.deepcopy(model), fused) < TOL


@pytest.mark.parametrize("same", ["static", "timm"])
def test_same_padding_subclasses_fold_and_standardized_weights_do_not(same):
    from tests.test_forwards import StaticSameConv2d, StdConv2d, TimmStyleConv2dSame

    torch.manual_seed(0)
    first = (
        StaticSameConv2d(3, 8, 3, 2, image=16)
        if same == "static"
        else TimmStyleConv2dSame(3, 8, 3, 2)
    )
    model = randomize_bn(
        nn.Sequential(first, nn.BatchNorm2d(8), nn.ReLU(), StdConv2d(8, 8, 3), nn.BatchNorm2d(8))
    )
    before = copy.deepcopy(model.state_dict())
    assert conv_bn_pairs(model.eval()) == [("0", "1")]
    fused = check(model, left=1)  # outputs equal; StdConv2d's batch norm stays
    assert type(fused[0]) is type(first) and isinstance(fused[1], nn.Identity)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # untouched
