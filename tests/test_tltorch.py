"""tensorly-torch layers in and out: exact conversion, MACs, ONNX, round trip, save/load."""

from __future__ import annotations

import copy
import json
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from thop import profile
from torch import nn

import decomp
from decomp.export import export
from decomp.factorize import CPConv2d, SVDLinear, TuckerConv2d, registry
from decomp.factorize.registry import Call
from decomp.metrics import count_macs, count_macs_competition
from decomp.plan import Skip
from decomp.tltorch import MARK_ATTR, plan_from_tltorch

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # tltorch's import warns about tensorly's deprecations
    import tltorch

ARCH = "tests.test_tltorch:tltorch_net"


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out - ref).detach().norm() / ref.detach().norm())


def _from_conv(conv: nn.Conv2d, factorization: str, **kw: object) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tensorly's SVD warns when a rank is padded
        return tltorch.FactorizedConv.from_conv(conv, factorization=factorization, **kw)


def _closed_form(module: nn.Module, inp: tuple[int, ...]) -> tuple[int, int]:
    """(thop, ptflops) MACs of a converted layer from its method's closed form."""
    method = registry.method_of(module)
    dense = method.dense(module)
    out = tuple(dense(torch.zeros(1, *inp)).shape)
    macs, _ = method.costs(dense, list(module.ranks), [Call((1, *inp), out)])
    bias = out[1] * (out[2] * out[3] if len(out) == 4 else 1) if dense.bias is not None else 0
    return macs, macs + bias


CONV_CASES = [  # (stride, padding, dilation, bias, padding_mode of the source conv)
    (1, 1, 1, True, "zeros"),
    ((2, 1), (1, 2), (1, 2), False, "zeros"),  # from_conv keeps stride[0]: (2, 2)
    (2, 0, 2, True, "reflect"),  # tltorch pads with zeros whatever the conv's padding_mode
    (1, (0, 1), (2, 1), True, "zeros"),
]


@pytest.mark.parametrize("factorization", ["tucker", "cp", "tt"])
@pytest.mark.parametrize("case", range(len(CONV_CASES)))
def test_convs_convert_exactly(factorization: str, case: int) -> None:
    stride, padding, dilation, bias, mode = CONV_CASES[case]
    torch.manual_seed(case)
    conv = nn.Conv2d(6, 10, 3, stride, padding, dilation, bias=bias, padding_mode=mode)
    impl = ["factorized", "reconstructed"][case % 2]
    layer = _from_conv(conv, factorization, rank=0.5, implementation=impl)
    model = nn.Sequential(layer, nn.ReLU()).eval()
    x = torch.randn(2, 6, 11, 9)
    converted = decomp.from_tltorch(model)
    kind = CPConv2d if factorization == "cp" else TuckerConv2d
    assert type(converted[0]) is kind and isinstance(model[0], tltorch.FactorizedConv)
    with torch.no_grad():
        ref, out = model(x), converted(x)
    assert out.shape == ref.shape
    assert _rel(out, ref) < 1e-5, f"{factorization} case {case}: {_rel(out, ref):.2e}"
    spatial = converted[0].core if kind is TuckerConv2d else converted[0].vertical
    assert spatial.stride[0] == (stride if isinstance(stride, int) else stride[0])
    thop, ptflops = _closed_form(converted[0], (6, 11, 9))
    assert count_macs(converted, (6, 11, 9)) == thop
    assert count_macs_competition(converted, (6, 11, 9)) == ptflops
    (lp,) = plan_from_tltorch(model).layers
    assert (lp.method, lp.ranks) == (kind.method, list(converted[0].ranks))


def test_the_motivating_example_counts_true_macs() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 32, 3, padding=1, bias=False)
    model = nn.Sequential(_from_conv(conv, "tucker", rank=0.5, implementation="factorized"))
    size = (16, 8, 8)
    assert count_macs(nn.Sequential(conv), size) == 294_912
    raw, _ = profile(copy.deepcopy(model), inputs=(torch.zeros(1, *size),), verbose=False)
    assert raw == 8_640  # thop alone sees almost nothing of tltorch's compute
    converted = decomp.from_tltorch(model)
    assert converted[0].ranks == (24, 12)
    thop, ptflops = _closed_form(converted[0], size)
    assert count_macs(converted, size) == thop == count_macs_competition(converted, size)
    assert thop == 64 * (16 * 12 + 24 * 12 * 9 + 32 * 24) == 227_328
    # decomp's counters convert a copy first, so the unconverted model counts the same
    assert count_macs(model, size) == thop == count_macs_competition(model, size)


def test_ranks_above_the_channel_counts_are_cut_exactly() -> None:
    torch.manual_seed(1)
    layer = tltorch.FactorizedConv(
        4, 6, 3, order=2, padding=1, factorization="tucker", rank=(9, 7, 3, 2), bias=True
    )
    layer.reset_parameters(std=0.5)
    layer.bias.data.normal_()
    model = nn.Sequential(layer).eval()
    converted = decomp.from_tltorch(model)
    assert converted[0].ranks == (6, 4)
    x = torch.randn(2, 4, 7, 7)
    assert _rel(converted(x), model(x)) < 1e-5
    (lp,) = plan_from_tltorch(model).layers
    assert "cut exactly to (6, 4)" in lp.reason


LINEAR_CASES = [  # (factorization, rank, bias, what it becomes)
    ("tucker", 0.3, True, SVDLinear),
    ("cp", 0.3, False, SVDLinear),
    ("cp", 40, True, nn.Linear),  # rank 40 > min(out, in): one dense layer is cheaper
    ("blocktt", 0.5, True, nn.Linear),
]


@pytest.mark.parametrize("factorization, rank, bias, kind", LINEAR_CASES)
def test_factorized_linears_convert_exactly(
    factorization: str, rank: float, bias: bool, kind: type
) -> None:
    torch.manual_seed(2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layer = tltorch.FactorizedLinear.from_linear(
            nn.Linear(24, 36, bias=bias),
            rank=rank,
            factorization=factorization,
            implementation="factorized",
            bias=bias,
        )
    model = nn.Sequential(layer).eval()
    converted = decomp.from_tltorch(model)
    assert type(converted[0]) is kind
    x = torch.randn(2, 3, 24)  # leading dimensions pass through, as in nn.Linear
    with torch.no_grad():
        assert _rel(converted(x), model(x)) < 1e-5
    (lp,) = plan_from_tltorch(model).layers
    if kind is SVDLinear:
        thop, ptflops = _closed_form(converted[0], (24,))
        assert (lp.method, lp.ranks) == ("svd", list(converted[0].ranks))
    else:
        thop, ptflops = 24 * 36, 24 * 36 + (36 if bias else 0)
        assert lp.skip is Skip.LAYER_KIND and lp.reason.startswith("dense nn.Linear")
    assert count_macs(converted, (24,)) == thop
    assert count_macs_competition(converted, (24,)) == ptflops


def tltorch_net(width: int = 6, joint: bool = True) -> nn.Module:
    """A small model of tltorch layers, one of every kind that converts, and (``joint``) one
    that does not."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        convs = [
            tltorch.FactorizedConv(
                3, width, 3, order=2, padding=1, factorization="tucker", rank=(4, 2, 3, 3)
            ),
            tltorch.FactorizedConv(
                width, width, 3, order=2, stride=2, factorization="cp", rank=5, bias=True
            ),
            tltorch.FactorizedConv(
                width, width, 3, order=2, padding=(1, 0), factorization="tt", rank=(1, 3, 2, 4, 1)
            ),
        ]
        pair = [nn.Conv2d(width, width, 1), nn.Conv2d(width, width, 1)]
        middle = tltorch.FactorizedConv.from_conv_list(pair, rank=0.5)[0] if joint else None
        heads = [
            tltorch.FactorizedLinear((2, 3), (2, 4), factorization="cp", rank=2),
            tltorch.FactorizedLinear((2, 4), (2, 5), factorization="blocktt", rank=2),
        ]
    for conv in convs:
        conv.reset_parameters(std=0.3)
    return nn.Sequential(
        *convs, nn.ReLU(), middle or nn.Identity(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), *heads
    ).eval()


def test_unconvertible_layers_are_named() -> None:
    model = tltorch_net()
    plan = plan_from_tltorch(model)
    left = {lp.name: lp.reason for lp in plan.layers if lp.skip is Skip.CUSTOM_FORWARD}
    assert set(left) == {"4", "4.main_conv"}
    assert "jointly parametrized" in left["4"] and "n_layers=2" in left["4.main_conv"]
    with pytest.raises(ValueError, match=r"2 tltorch layer\(s\) cannot be converted: 4 \("):
        decomp.from_tltorch(model, strict=True)


def test_a_converted_model_saves_and_loads(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    torch.manual_seed(3)
    model = tltorch_net()
    with caplog.at_level(logging.WARNING, logger="decomp.tltorch"):
        converted = decomp.from_tltorch(model)
    assert "left as tltorch layers: 4 (" in caplog.text
    kinds = [type(m).__name__ for m in converted]
    assert kinds[:3] == ["TuckerConv2d", "CPConv2d", "TuckerConv2d"]
    assert kinds[7:] == ["SVDLinear", "Linear"] and kinds[4] == "SubFactorizedConv"
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert _rel(converted(x), model(x)) < 1e-5
    path = decomp.save(converted, tmp_path / "tl.pt", arch=ARCH, input_size=(3, 8, 8))
    loaded = decomp.load(path)
    assert torch.load(path, weights_only=True)["plans"][0]["method"] == "tltorch"
    with torch.no_grad():
        assert torch.equal(loaded(x), converted(x))
    assert [type(m) for m in loaded] == [type(m) for m in converted]


def test_the_converted_model_exports_to_onnx(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    import onnxruntime as ort

    torch.manual_seed(4)
    model = tltorch_net(joint=False)  # a jointly parametrized layer would stay a tltorch one
    converted = decomp.from_tltorch(model, strict=True)
    error = export(converted, tmp_path / "m.onnx", "onnx", (3, 8, 8), tolerance=1e-5)
    assert error is not None and error < 1e-5
    x = torch.randn(3, 3, 8, 8)
    session = ort.InferenceSession(str(tmp_path / "m.onnx"))
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        assert _rel(torch.from_numpy(got), model(x)) < 1e-5  # against tltorch's own forward


def tiny_dense(width: int = 8) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(width, width, 3, stride=(2, 1), padding=(1, 2), dilation=(1, 2), bias=False),
        nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1),
    ).eval()


def _decomposed() -> nn.Module:
    torch.manual_seed(5)
    dense = tiny_dense()
    p = decomp.plan(dense, method="tucker", rank="ratio:0.5", input_size=(3, 8, 8), force=True)
    layer = next(lp for lp in p.layers if lp.name == "2")
    layer.method, layer.ranks = "cp", [5]
    return decomp.apply(dense, p)


def test_round_trip_through_tltorch_is_exact(tmp_path: Path) -> None:
    model = _decomposed()
    assert [type(model[i]) for i in (0, 2, 4)] == [TuckerConv2d, CPConv2d, TuckerConv2d]
    tl_model = decomp.to_tltorch(model)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        ref = model(x)
        for i in (0, 2, 4):
            assert isinstance(tl_model[i], tltorch.FactorizedConv)
            assert tl_model[i].implementation == "factorized"
        assert _rel(tl_model(x), ref) < 1e-5
        back = decomp.from_tltorch(tl_model)
        assert _rel(back(x), ref) < 1e-5
    assert repr(back) == repr(model)  # the same modules, ranks and hyper-parameters
    assert decomp.applied_plans(back) == decomp.applied_plans(model)  # nothing added
    assert not hasattr(back, MARK_ATTR)
    path = decomp.save(back, tmp_path / "back.pt", arch="tests.test_tltorch:tiny_dense")
    with torch.no_grad():
        assert torch.equal(decomp.load(path)(x), back(x))


def test_to_tltorch_leaves_what_tltorch_cannot_express(caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(6)
    conv = nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect")
    model = nn.Sequential(decomp.factorize.tucker2(conv, (2, 2)))
    with caplog.at_level(logging.WARNING, logger="decomp.tltorch"):
        out = decomp.to_tltorch(model)
    assert type(out[0]) is TuckerConv2d and "padding_mode=reflect" in caplog.text
    odd = decomp.factorize.cp(nn.Conv2d(4, 4, 3, padding="same", dilation=2), 3)
    even = decomp.factorize.tucker2(nn.Conv2d(4, 4, 2, padding="same"), (2, 2))
    out = decomp.to_tltorch(nn.Sequential(odd, even))
    assert isinstance(out[0], tltorch.FactorizedConv) and out[0].padding.tolist() == [2, 2]
    assert type(out[1]) is TuckerConv2d and "asymmetric" in caplog.text
    x = torch.randn(1, 4, 7, 7)
    assert _rel(out[0](x), odd(x)) < 1e-5


def test_a_shared_layer_is_converted_once_under_every_name() -> None:
    torch.manual_seed(7)
    layer = _from_conv(nn.Conv2d(4, 4, 3, padding=1), "cp", rank=3, implementation="factorized")
    model = nn.Sequential(layer, nn.ReLU(), layer).eval()
    converted = decomp.from_tltorch(model)
    assert converted[0] is converted[2] and type(converted[0]) is CPConv2d
    (lp,) = plan_from_tltorch(model).layers
    assert (lp.name, lp.aliases) == ("0", ["2"])
    x = torch.randn(1, 4, 6, 6)
    assert _rel(converted(x), model(x)) < 1e-5


def test_a_model_without_tltorch_layers_is_left_alone() -> None:
    model = tiny_dense()
    out = decomp.from_tltorch(model)
    assert out is not model and repr(out) == repr(model) and not decomp.applied_plans(out)


BACKEND_SCRIPT = """
import sys, warnings
warnings.simplefilter("ignore")
import tensorly as tl
tl.set_backend("numpy")
import torch
import decomp, decomp.tltorch
from decomp._tensorly import partial_tucker
assert "tltorch" not in sys.modules, "import decomp imported tltorch"
decomp.from_tltorch(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3)))
assert "tltorch" not in sys.modules, "from_tltorch imported tltorch"
assert tl.get_backend() == "numpy", tl.get_backend()
conv = torch.nn.Conv2d(4, 6, 3)
decomp.to_tltorch(torch.nn.Sequential(decomp.factorize.tucker2(conv, (3, 2))))
print("after to_tltorch:", tl.get_backend())
tl.set_backend("numpy")
core, factors = partial_tucker(conv.weight.detach(), [3, 2], [0, 1])
assert isinstance(core, torch.Tensor) and tl.get_backend() == "numpy"
print("decomp under numpy: ok")
"""


def test_the_global_backend_side_effect() -> None:
    """import decomp and from_tltorch do not import tltorch; to_tltorch does, and tltorch's
    import sets tensorly's global backend to 'pytorch' (its layers need it); decomp's own
    tensorly calls work under any global backend and leave it as it was."""
    result = subprocess.run(
        [sys.executable, "-c", BACKEND_SCRIPT],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[1],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "after to_tltorch: pytorch" in result.stdout
    assert "decomp under numpy: ok" in result.stdout


def test_the_command_line_counts_and_exports_tltorch_models(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from decomp.cli import app

    torch.manual_seed(8)
    model = tltorch_net(joint=False)
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    args = [str(tmp_path / "sd.pt"), "--arch", ARCH, "--arch-kwargs", '{"joint": false}']
    args += ["--input-size", "3,8,8"]
    result = CliRunner().invoke(app, ["inspect", *args, "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    converted = decomp.from_tltorch(model)
    raw, _ = profile(copy.deepcopy(model), inputs=(torch.zeros(1, 3, 8, 8),), verbose=False)
    assert report["macs"] == count_macs(converted, (3, 8, 8)) > raw
    assert report["macs_competition"] == count_macs_competition(converted, (3, 8, 8))
    result = CliRunner().invoke(app, ["export", *args, "--output", str(tmp_path / "m.onnx")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "m.onnx").stat().st_size > 0
