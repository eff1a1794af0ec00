"""The numerical ladder for the factorizers: wiring, full rank, planted rank, lossy, MACs."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from decomp._tensorly import partial_tucker
from decomp.factorize import (
    CPDivergenceError,
    Factorized,
    cp,
    cp_factors,
    svd,
    svd_factors,
    tucker2,
    tucker2_factors,
)
from decomp.factorize.cp import CPFactors, check_divergence
from decomp.metrics import count_macs

CONV_CASES = {
    "plain": dict(kernel_size=3, padding=1),
    "stride2": dict(kernel_size=3, stride=2, padding=1),
    "dilated": dict(kernel_size=3, dilation=2, padding=2),
    "no-bias": dict(kernel_size=3, padding=1, bias=False),
    "asym-kernel": dict(kernel_size=(3, 5), stride=(2, 1), padding=(1, 2)),
    "asym-pad": dict(kernel_size=3, padding=(0, 2)),
    "same": dict(kernel_size=(3, 4), padding="same"),
    "valid": dict(kernel_size=3, padding="valid"),
    "reflect": dict(kernel_size=3, padding=1, padding_mode="reflect"),
    "circular": dict(kernel_size=3, padding=(2, 1), padding_mode="circular", stride=(1, 2)),
}


def rel_error(ref: torch.Tensor, out: torch.Tensor) -> float:
    return ((ref - out).norm() / ref.norm()).item()


def make_conv(c_in: int = 6, c_out: int = 10, **kw) -> nn.Conv2d:
    torch.manual_seed(0)
    return nn.Conv2d(c_in, c_out, **kw)


@pytest.mark.parametrize("case", sorted(CONV_CASES))
def test_tucker_full_rank_reproduces_conv(case):
    conv = make_conv(**CONV_CASES[case])
    x = torch.randn(2, 6, 13, 11)
    module = tucker2(conv, (10, 6))
    assert rel_error(conv(x), module(x)) < 1e-5, case


@pytest.mark.parametrize("case", sorted(CONV_CASES))
def test_cp_wiring_matches_reconstructed_kernel(case):
    """The four-layer CP module computes exactly the conv of its reconstructed kernel."""
    conv = make_conv(**CONV_CASES[case])
    module = cp(conv, 5)
    kernel = torch.einsum(
        "or,ri,rh,rw->oihw",
        module.last.weight[:, :, 0, 0],
        module.first.weight[:, :, 0, 0],
        module.vertical.weight[:, 0, :, 0],
        module.horizontal.weight[:, 0, 0, :],
    )
    x = torch.randn(2, 6, 13, 11)
    ref = F.conv2d(
        F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode)
        if conv.padding_mode != "zeros"
        else x,
        kernel,
        conv.bias,
        conv.stride,
        0 if conv.padding_mode != "zeros" else conv.padding,
        conv.dilation,
    )
    assert rel_error(ref, module(x)) < 1e-5, case


@pytest.mark.parametrize("case", ["plain", "stride2", "asym-kernel"])
def test_tucker_wiring_matches_reconstructed_kernel(case):
    conv = make_conv(**CONV_CASES[case])
    module = tucker2(conv, (4, 3))
    factors = tucker2_factors(conv.weight, (4, 3))
    x = torch.randn(2, 6, 13, 11)
    ref = F.conv2d(x, factors.reconstruct(), conv.bias, conv.stride, conv.padding, conv.dilation)
    assert rel_error(ref, module(x)) < 1e-5


@pytest.mark.parametrize("bias", [True, False])
def test_svd_full_rank_reproduces_linear_and_pointwise(bias):
    torch.manual_seed(0)
    linear = nn.Linear(30, 20, bias=bias)
    x = torch.randn(4, 7, 30)
    assert rel_error(linear(x), svd(linear, 20)(x)) < 1e-5
    conv = nn.Conv2d(12, 16, 1, stride=2, padding=1, bias=bias)
    x = torch.randn(2, 12, 9, 9)
    assert rel_error(conv(x), svd(conv, 12)(x)) < 1e-5


def test_bias_only_on_last_and_only_if_original_had_one():
    for bias in (True, False):
        conv = make_conv(kernel_size=3, bias=bias)
        for module in (tucker2(conv, (3, 3)), cp(conv, 3)):
            children = list(module.children())
            assert all(c.bias is None for c in children[:-1])
            assert (children[-1].bias is not None) == bias
            if bias:
                assert torch.equal(children[-1].bias, conv.bias)


def test_factorized_modules_are_plain_layers_with_dtype_kept():
    conv = make_conv(kernel_size=3).double()
    for module in (tucker2(conv, (3, 3)), cp(conv, 3), svd(nn.Linear(8, 8).double(), 4)):
        assert isinstance(module, Factorized)
        assert {type(c) for c in module.children()} <= {nn.Conv2d, nn.Linear}
        assert all(p.dtype == torch.float64 for p in module.parameters())


def test_tucker_recovers_planted_ranks():
    torch.manual_seed(0)
    core = torch.randn(4, 3, 3, 3)
    u_out = torch.linalg.qr(torch.randn(16, 4))[0]
    u_in = torch.linalg.qr(torch.randn(12, 3))[0]
    weight = torch.einsum("or,rshw,is->oihw", u_out, core, u_in)
    assert rel_error(weight, tucker2_factors(weight, (4, 3)).reconstruct()) < 1e-5


@pytest.mark.parametrize("dims,rank", [((16, 12, 3, 3), 4), ((10, 8, 3, 3), 3), ((8, 8, 5, 5), 6)])
def test_cp_recovers_planted_kernel(dims, rank):
    torch.manual_seed(0)
    factors = [torch.randn(d, rank) for d in dims]
    weight = torch.einsum("or,ir,hr,wr->oihw", *factors)
    assert rel_error(weight, cp_factors(weight, rank).reconstruct()) < 1e-4


def test_svd_recovers_planted_rank():
    torch.manual_seed(0)
    matrix = torch.randn(40, 5) @ torch.randn(5, 60)
    assert rel_error(matrix, svd_factors(matrix, 5).reconstruct()) < 1e-5


def test_error_falls_as_rank_grows():
    torch.manual_seed(0)
    weight = torch.randn(16, 12, 3, 3)
    tucker = [rel_error(weight, tucker2_factors(weight, (r, r)).reconstruct()) for r in (2, 6, 10)]
    cp_err = [rel_error(weight, cp_factors(weight, r).reconstruct()) for r in (2, 8, 32)]
    matrix = weight.reshape(16, -1)
    svd_err = [rel_error(matrix, svd_factors(matrix, r).reconstruct()) for r in (2, 8, 14)]
    for errors in (tucker, cp_err, svd_err):
        assert errors == sorted(errors, reverse=True) and errors[-1] < errors[0] * 0.8, errors


@pytest.mark.parametrize(
    "shape, ranks",
    [
        ((32, 32, 3, 3), None),
        ((48, 24, 3, 3), None),
        ((20, 40, 5, 5), None),
        ((64, 3, 7, 7), [32, 2]),  # a stem: the stopping rule alone quit after 2 sweeps here
    ],
)
def test_tucker_error_no_worse_than_tensorly(shape, ranks):
    torch.manual_seed(0)
    weight = torch.randn(*shape)
    ranks = ranks or [shape[0] // 2, shape[1] // 2]
    core, (a, b) = partial_tucker(weight, ranks, modes=[0, 1])
    theirs = rel_error(weight, torch.einsum("or,rshw,is->oihw", a, core, b))
    ours = rel_error(weight, tucker2_factors(weight, tuple(ranks)).reconstruct())
    assert ours <= theirs + 1e-6, (ours, theirs)


def test_macs_of_factorized_modules_match_closed_form():
    c_in, c_out, h, w = 8, 12, 10, 14
    conv = nn.Conv2d(c_in, c_out, (3, 5), stride=(2, 1), padding=(1, 2))
    h_out, w_out = 5, 14
    size = (c_in, h, w)
    r_out, r_in = 5, 4
    expected = h * w * c_in * r_in + h_out * w_out * (r_in * r_out * 15 + r_out * c_out)
    assert count_macs(tucker2(conv, (r_out, r_in)), size) == expected
    r = 6  # cp: 1x1 at input size, kx1 at (h_out, w), 1xk and 1x1 at output size
    expected = h * w * c_in * r + h_out * w * r * 3 + h_out * w_out * r * (5 + c_out)
    assert count_macs(cp(conv, r), size) == expected
    pointwise = nn.Conv2d(c_in, c_out, 1, stride=2)
    assert count_macs(svd(pointwise, 3), size) == 5 * 7 * 3 * (c_in + c_out)
    assert count_macs(svd(nn.Linear(30, 20), 7), (30,)) == 7 * (30 + 20)


def test_grouped_conv_is_refused_with_a_reason():
    conv = nn.Conv2d(8, 8, 3, groups=4)
    with pytest.raises(ValueError, match="groups=4"):
        tucker2(conv, (2, 2))
    with pytest.raises(ValueError, match="groups=4"):
        cp(conv, 2)


def test_bad_ranks_name_the_limit():
    conv = make_conv(kernel_size=3)
    with pytest.raises(ValueError, match="Cout=10"):
        tucker2(conv, (11, 3))
    with pytest.raises(ValueError, match="1 <= rank"):
        tucker2(conv, (0, 3))
    with pytest.raises(ValueError, match="1x1"):
        svd(conv, 2)


def test_cp_divergence_is_detected():
    torch.manual_seed(0)
    weight = torch.randn(4, 4, 3, 3)
    huge = torch.randn(4, 2) * 1e3
    degenerate = CPFactors(
        out=torch.cat([huge, -huge], 1),
        inp=torch.ones(4, 4),
        vertical=torch.ones(3, 4),
        horizontal=torch.ones(3, 4),
    )
    with pytest.raises(CPDivergenceError):
        check_divergence(degenerate, weight)
    nan = CPFactors(*(torch.full((d, 2), float("nan")) for d in (4, 4, 3, 3)))
    with pytest.raises(CPDivergenceError):
        check_divergence(nan, weight)


@settings(max_examples=25, deadline=None)
@given(
    k=st.tuples(st.integers(1, 4), st.integers(1, 4)),
    stride=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    pad=st.tuples(st.integers(0, 2), st.integers(0, 2)),
    dil=st.tuples(st.integers(1, 2), st.integers(1, 2)),
    bias=st.booleans(),
)
def test_random_hyperparameters_keep_output_shape(k, stride, pad, dil, bias):
    conv = nn.Conv2d(4, 5, k, stride=stride, padding=pad, dilation=dil, bias=bias)
    x = torch.randn(1, 4, 12, 11)
    ref = conv(x)
    assert tucker2(conv, (2, 2))(x).shape == ref.shape
    assert cp(conv, 3, n_iter_max=5)(x).shape == ref.shape
