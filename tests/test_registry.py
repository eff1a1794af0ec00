"""The method registry: a method defined and registered here, in the test file alone, is picked
up by plan, apply, the budget checks, save/load and the command line."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import torch
from torch import nn

import decomp
from decomp.factorize import Factorized, Method, registry
from decomp.factorize.registry import Call
from decomp.plan import Plan, Skip, method_choices
from tests.conftest import TinyNet

SIZE = (3, 16, 16)


class HalfLinear(Factorized):
    """Linear (in -> r, no bias) -> Linear (r -> out): children first/last."""

    method = "toy"


class ToyMethod(Method):
    """W ~ (W Q_r) Q_r^T with Q_r the first r columns of the QR basis of W's rows.

    Exact at rank min(out, in) (Q then spans W's rows), lossy below it (unlike SVD, the first
    columns are not the best ones): enough to tell wiring from arithmetic.
    """

    name = "toy"
    module_types = (HalfLinear,)

    def accepts(self, layer: nn.Module) -> str | None:
        return None if isinstance(layer, nn.Linear) else "toy applies to linear layers"

    def costs(self, layer: nn.Module, ranks: Sequence[int], calls: Sequence[Call]) -> tuple:
        (r,) = ranks
        bias = layer.out_features if layer.bias is not None else 0
        return r * (layer.in_features + layer.out_features), r * (
            layer.in_features + layer.out_features
        ) + bias

    def build(self, layer: nn.Module, ranks: Sequence[int]) -> HalfLinear:
        (r,) = ranks
        first = nn.Linear(layer.in_features, r, bias=False)
        last = nn.Linear(r, layer.out_features, bias=layer.bias is not None)
        return HalfLinear((r,), first=first, last=last)

    @torch.no_grad()
    def factorize(self, layer: nn.Module, ranks: Sequence[int]) -> HalfLinear:
        module = self.build(layer, ranks)
        q, _ = torch.linalg.qr(layer.weight.T)  # (in, min(out, in)), orthonormal columns
        basis = q[:, : ranks[0]]
        module.first.weight.copy_(basis.T)
        module.last.weight.copy_(layer.weight @ basis)
        if layer.bias is not None:
            module.last.bias.copy_(layer.bias)
        return module


@pytest.fixture
def toy() -> Iterator[Method]:
    method = registry.register(ToyMethod())
    yield method
    registry.unregister(method.name)


def tiny() -> TinyNet:
    torch.manual_seed(0)
    return TinyNet().eval()


def test_plan_and_apply_use_a_registered_method(toy: Method) -> None:
    assert "toy" in method_choices()
    model = tiny()
    p = decomp.plan(model, "toy", "ratio:1.0", SIZE, force=True)
    assert [lp.name for lp in p.decomposed] == ["fc"] and p.decomposed[0].method == "toy"
    skipped = {lp.name: lp for lp in p.layers if not lp.method}
    assert all(lp.skip is Skip.LAYER_KIND for lp in skipped.values())
    assert "use tucker or cp or auto" in skipped["conv1"].reason  # the registry's suggestions
    compressed = decomp.apply(model, p)
    assert isinstance(compressed.fc, HalfLinear)
    x = torch.randn(2, *SIZE)
    with torch.no_grad():
        torch.testing.assert_close(compressed(x), model(x), rtol=1e-5, atol=1e-5)
    assert decomp.count_params(compressed) == p.params_after


def test_lossy_rank_changes_outputs_and_costs_follow_the_method(toy: Method) -> None:
    model = tiny()
    p = decomp.plan(model, "toy", 4, SIZE)
    (fc,) = p.decomposed
    assert fc.ranks == [4] and fc.macs_after == 4 * (32 + 10)
    compressed = decomp.apply(model, p)
    x = torch.randn(2, *SIZE)
    with torch.no_grad():
        assert not torch.allclose(compressed(x), model(x), atol=1e-3)


def test_a_budget_refuses_a_method_without_a_grid(toy: Method) -> None:
    with pytest.raises(ValueError, match="toy has no error curve"):
        decomp.plan(tiny(), "toy", input_size=SIZE, target_macs=0.5)


def test_save_and_load_rebuild_a_registered_method(toy: Method, tmp_path: Path) -> None:
    model = tiny()
    compressed = decomp.decompose(model, "toy", 4, SIZE)
    path = decomp.save(compressed, tmp_path / "toy.pt", arch="tests.conftest:TinyNet")
    loaded = decomp.load(path)
    assert isinstance(loaded.fc, HalfLinear) and loaded.fc.ranks == (4,)
    x = torch.randn(2, *SIZE)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), compressed(x))


def test_unknown_methods_list_the_registered_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown method 'nope'; expected one of \['auto', "):
        decomp.plan(tiny(), "nope", input_size=SIZE)
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        Plan.from_dict(
            {
                "method": "nope",
                "rank": "1",
                "input_size": [3, 16, 16],
                "layers": [{"name": "fc", "kind": "linear", "shape": [10, 32], "method": "nope"}],
            }
        )


def test_auto_is_a_policy_over_the_registry() -> None:
    p = decomp.plan(tiny(), "auto", "ratio:0.5", SIZE, force=True)
    methods = {lp.name: lp.method for lp in p.layers}
    assert methods["conv1"] == "tucker" and methods["down"] == "svd" and methods["fc"] == "svd"
    assert registry.names()[:2] == ["tucker", "svd"] and registry.choices()[-1] == "auto"


def test_the_command_line_offers_a_registered_method(toy: Method, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from decomp.cli import app

    source = decomp.save(tiny(), tmp_path / "tiny.pt", arch="tests.conftest:TinyNet")
    target = tmp_path / "tiny_toy.pt"
    args = ["decompose", str(source), "--input-size", "3,16,16", "-o", str(target)]
    result = CliRunner().invoke(app, [*args, "--method", "toy", "--rank", "4"])
    assert result.exit_code == 0, result.output
    assert isinstance(decomp.load(target).fc, HalfLinear)
    registry.unregister("toy")  # gone from the registry, gone from the command line
    refused = CliRunner().invoke(app, [*args, "--method", "toy", "--force"])
    assert refused.exit_code == 2 and "unknown method 'toy'" in refused.output
    registry.register(ToyMethod())  # for the fixture's teardown
