"""CP factorization of a conv: 1x1 (Cin->R) -> kx1 depthwise -> 1xk depthwise -> 1x1 (R->Cout).

The kernel W (Cout, Cin, kh, kw) is approximated by R rank-one terms
``sum_r a_r (x) b_r (x) c_r (x) d_r`` (Lebedev et al., "Speeding-up convolutional neural networks
using fine-tuned CP-decomposition", ICLR 2015), computed by decomp's own CP-ALS
(:mod:`decomp.factorize.cp_als`). The vertical and horizontal depthwise convs split the stride,
padding and dilation by axis, so the layer keeps its output shape for any of them (and for 'same'
padding, which needs stride 1).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from decomp.factorize.base import (
    Factorized,
    check_plain_conv,
    check_rank,
    conv_like,
    copy_bias,
    spatial_conv_only,
)
from decomp.factorize.cp_als import Progress, cp_als
from decomp.factorize.linalg import solver_threads
from decomp.factorize.registry import Call, Method, register

logger = logging.getLogger(__name__)

DIVERGENCE_RATIO = 1e3  # a rank-one term this much larger than the kernel means CP-ALS degenerated


class CPDivergenceError(ValueError):
    """CP-ALS degenerated: huge cancelling components or a non-finite result."""


@dataclass(frozen=True)
class CPFactors:
    """Factors of a CP kernel, weights folded in and norms balanced across the four modes.

    Attributes:
        out: (Cout, R); inp: (Cin, R); vertical: (kh, R); horizontal: (kw, R).
    """

    out: Tensor
    inp: Tensor
    vertical: Tensor
    horizontal: Tensor

    def reconstruct(self) -> Tensor:
        """The approximated kernel, (Cout, Cin, kh, kw), as ``out @ khatri_rao(inp, vertical,
        horizontal).T``: one GEMM, no array larger than the kernel (a four-operand einsum went
        through a (Cout, Cin, kh, R) intermediate, 480 MB for a 512-channel layer at R = 154)."""
        r = self.out.shape[1]
        kr = self.inp[:, None, None] * self.vertical[None, :, None] * self.horizontal[None, None]
        kernel = self.out @ kr.reshape(-1, r).T
        return kernel.reshape(self.out.shape[0], *kr.shape[:3])


def _balanced(factors: list[Tensor]) -> list[Tensor]:
    """Rescale the factors so that each rank-one term has the same column norm in every mode."""
    norms = torch.stack([f.norm(dim=0) for f in factors])  # (4, R)
    tiny = torch.finfo(norms.dtype).tiny
    scale = norms.prod(0).clamp_min(tiny) ** 0.25
    return [f / n.clamp_min(tiny) * scale for f, n in zip(factors, norms, strict=True)]


def check_divergence(factors: CPFactors, weight: Tensor) -> float:
    """Relative error of the factors; raise CPDivergenceError on a degenerate solution."""
    term_norms = (
        factors.out.norm(dim=0)
        * factors.inp.norm(dim=0)
        * factors.vertical.norm(dim=0)
        * factors.horizontal.norm(dim=0)
    )
    w_norm = weight.norm()
    error = ((weight - factors.reconstruct()).norm() / w_norm).item()
    worst = (term_norms.max() / w_norm).item()
    if not (torch.isfinite(term_norms).all() and error == error and error < 1.0):
        raise CPDivergenceError(f"CP-ALS diverged (relative error {error:.3g})")
    if worst > DIVERGENCE_RATIO:
        raise CPDivergenceError(
            f"CP-ALS degenerated: a rank-one term is {worst:.3g}x the kernel's norm"
        )
    return error


RIDGE = 1e-4
"""The fallback's Tikhonov weight: ``RIDGE / R`` relative to ||W||^2 (see :func:`cp_factors`)."""


def cp_factors(
    weight: Tensor,
    rank: int,
    n_iter_max: int = 100,
    tol: float = 1e-6,
    *,
    progress: Progress | None = None,
) -> CPFactors:
    """CP factors of a conv kernel by CP-ALS, with a check for degenerate solutions.

    The ALS is :func:`decomp.factorize.cp_als.cp_als`, in float32 for float32 kernels (float64
    for float64 ones). A degenerate run (cancelling components of huge norm, a non-finite or
    useless fit) is retried once with a ridge penalty of ``RIDGE / rank`` relative to ||W||^2,
    which keeps the factors bounded; if that fails too, CPDivergenceError says so.

    Args:
        weight: (Cout, Cin, kh, kw) kernel.
        rank: R >= 1 (it may exceed every mode's size; CP has no such bound).
        n_iter_max: most ALS sweeps on the compressed core, and again on the full kernel.
        tol: stop when a sweep lowers the relative reconstruction error by less than this.
        progress: ``progress(sweep, rel_error)`` after every sweep; a ridge retry counts its
            sweeps from 1 again.
    """
    rank = check_rank(rank, weight.numel(), f"a kernel of {weight.numel()} entries")
    w = weight.detach().to(torch.promote_types(weight.dtype, torch.float32))
    if not w.any():  # a zero kernel (a pruned layer): zero factors are exact
        return CPFactors(*(torch.zeros(size, rank, dtype=weight.dtype) for size in weight.shape))
    last_error: CPDivergenceError | None = None
    for ridge in (0.0, RIDGE / rank):
        with solver_threads(2.0 * w.numel() * rank):  # the check's GEMM too, not just the ALS
            factors, _ = cp_als(
                w, rank, n_iter_max=n_iter_max, tol=tol, ridge=ridge, progress=progress
            )
            balanced = _balanced(factors)
            try:
                error = check_divergence(CPFactors(*balanced), w)
            except CPDivergenceError as exc:
                if not ridge:
                    logger.warning("%s; retrying with a ridge penalty", exc)
                last_error = exc
                continue
        logger.debug("CP rank %d: relative error %.4f (ridge %g)", rank, error, ridge)
        return CPFactors(*(f.to(weight.dtype) for f in balanced))
    raise CPDivergenceError(f"{last_error}; use tucker or a lower CP rank for this layer")


def _split(value: tuple[int, int] | str, axis: int, neutral: int) -> tuple[int, int] | str:
    """The per-axis part of a conv hyper-parameter; strings ('same', 'valid') pass through."""
    if isinstance(value, str):
        return value
    return (value[0], neutral) if axis == 0 else (neutral, value[1])


def build_cp(conv: nn.Conv2d, rank: int) -> CPConv2d:
    """The CP module for ``conv`` with uninitialised weights (shapes only)."""
    check_plain_conv(conv, "cp")
    kh, kw = conv.kernel_size
    rank = check_rank(rank, conv.weight.numel(), f"a kernel of {conv.weight.numel()} entries")

    def depthwise(axis: int) -> nn.Conv2d:
        return conv_like(
            conv,
            rank,
            rank,
            (kh, 1) if axis == 0 else (1, kw),
            stride=_split(conv.stride, axis, 1),
            padding=_split(conv.padding, axis, 0),
            dilation=_split(conv.dilation, axis, 1),
            groups=rank,
            padding_mode=conv.padding_mode,
        )

    return CPConv2d(
        (rank,),
        first=conv_like(conv, conv.in_channels, rank),
        vertical=depthwise(0),
        horizontal=depthwise(1),
        last=conv_like(conv, rank, conv.out_channels, bias=conv.bias is not None),
    )


@torch.no_grad()
def cp(conv: nn.Conv2d, rank: int, **als: float) -> CPConv2d:
    """Replace-ready CP factorization of an ungrouped ``nn.Conv2d``.

    Args:
        conv: the layer; stride, padding and dilation are split between the kx1 and 1xk
            depthwise convs, its bias (if any) goes to the last 1x1.
        rank: the CP rank R.
        **als: ``n_iter_max`` / ``tol`` for :func:`cp_factors`.
    """
    module = build_cp(conv, rank)
    f = cp_factors(conv.weight, rank, **als)
    module.first.weight.copy_(f.inp.T[:, :, None, None])
    module.vertical.weight.copy_(f.vertical.T[:, None, :, None])
    module.horizontal.weight.copy_(f.horizontal.T[:, None, None, :])
    module.last.weight.copy_(f.out[:, :, None, None])
    copy_bias(conv, module.last)
    return module


class CPConv2d(Factorized):
    """1x1 (Cin->R) -> kx1 depthwise -> 1xk depthwise -> 1x1 (R->Cout); children
    first/vertical/horizontal/last."""

    method = "cp"


class CPMethod(Method):
    """CP for kxk convs: rank ``[R]``, the larger of the two channel unfoldings' ranks."""

    name = "cp"
    module_types = (CPConv2d,)
    modes = 2

    def accepts(self, layer: nn.Module) -> str | None:
        return spatial_conv_only(layer, self.name)

    def combine(self, mode_ranks: list[int]) -> list[int]:
        return [0] if min(mode_ranks) == 0 else [max(mode_ranks)]

    def costs(
        self, layer: nn.Module, ranks: Sequence[int], calls: Sequence[Call]
    ) -> tuple[int, int]:
        """The kx1 conv runs at the output height and the input width."""
        (r,) = ranks
        c_out, c_in, (kh, kw) = layer.out_channels, layer.in_channels, layer.kernel_size
        in_hw = sum(c.inp[2] * c.inp[3] for c in calls)
        mid_hw = sum(c.out[2] * c.inp[3] for c in calls)
        out_hw = sum(c.out[2] * c.out[3] for c in calls)
        macs = in_hw * r * c_in + mid_hw * r * kh + out_hw * r * (kw + c_out)
        bias = c_out if layer.bias is not None else 0
        return macs, r * (c_in + kh + kw + c_out) + bias

    def factorize(self, layer: nn.Module, ranks: Sequence[int]) -> CPConv2d:
        return cp(layer, ranks[0])

    def build(self, layer: nn.Module, ranks: Sequence[int]) -> CPConv2d:
        return build_cp(layer, ranks[0])

    @torch.no_grad()
    def dense(self, module: CPConv2d) -> nn.Conv2d:
        first, vertical, horizontal, last = (
            module.first,
            module.vertical,
            module.horizontal,
            module.last,
        )

        def joined(v: tuple[int, int] | str, h: tuple[int, int] | str) -> tuple[int, int] | str:
            return v if isinstance(v, str) else (v[0], h[1])

        conv = conv_like(
            first,
            first.in_channels,
            last.out_channels,
            (vertical.kernel_size[0], horizontal.kernel_size[1]),
            stride=joined(vertical.stride, horizontal.stride),
            padding=joined(vertical.padding, horizontal.padding),
            dilation=joined(vertical.dilation, horizontal.dilation),
            padding_mode=vertical.padding_mode,
            bias=last.bias is not None,
        )
        factors = CPFactors(
            out=last.weight[:, :, 0, 0],
            inp=first.weight[:, :, 0, 0].T,
            vertical=vertical.weight[:, 0, :, 0].T,
            horizontal=horizontal.weight[:, 0, 0, :].T,
        )
        conv.weight.copy_(factors.reconstruct())
        copy_bias(last, conv)
        return conv


register(CPMethod())
