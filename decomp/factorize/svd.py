"""Truncated SVD of nn.Linear and 1x1 nn.Conv2d layers: two thin layers instead of one.

W (out, in) ~ (W V_r) V_r^T or U_r (U_r^T W), with the top-r singular vectors taken from the
eigendecomposition of the smaller Gram matrix: no full SVD is ever built.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from decomp.factorize.base import (
    Factorized,
    Whitening,
    check_rank,
    conv_like,
    copy_bias,
    layer_kind,
    numel,
)
from decomp.factorize.linalg import gram_eigh, top_eigvecs
from decomp.factorize.registry import Call, Method, RankGrid, register


@dataclass(frozen=True)
class SVDFactors:
    """W (out, in) ~ last @ first, with first (r, in) and last (out, r)."""

    first: Tensor
    last: Tensor

    def reconstruct(self) -> Tensor:
        """The approximated matrix, (out, in)."""
        return self.last @ self.first


def svd_factors(matrix: Tensor, rank: int, whitening: Whitening | None = None) -> SVDFactors:
    """Best rank-``rank`` factors of a matrix (Eckart-Young), in the matrix's dtype.

    One factor is orthonormal singular vectors, the other is the matrix projected on them, so
    no division by small singular values is needed and full rank is exact to rounding.

    With ``whitening`` the fit is to the layer's outputs on data, not to its weights: the
    vectors are the leading left singular vectors of ``W root``, i.e. the principal directions
    of the outputs ``W x`` (the response reconstruction of Zhang et al., TPAMI 2016), and the
    matrix is projected on them.
    """
    out_f, in_f = matrix.shape
    rank = check_rank(rank, min(out_f, in_f), f"a {out_f}x{in_f} matrix")
    if whitening is None:
        _, vectors, left = gram_eigh(matrix)
    else:  # the output directions: left vectors, whichever side is smaller
        whitened = matrix.double() @ whitening.root
        vectors, left = top_eigvecs(whitened @ whitened.T, rank)[0], True
    # the products run in the matrix's dtype (at least float32): a float64 copy of a large
    # layer (vgg16's 4096 x 25088 classifier: 0.8 GB) would double the peak memory
    work = torch.promote_types(matrix.dtype, torch.float32)
    m = matrix.detach().to(work)
    basis = vectors[:, :rank].to(work)
    if left:  # basis spans the columns: W ~ U (U^T W)
        first, last = basis.T @ m, basis
    else:  # basis spans the rows: W ~ (W V) V^T
        first, last = basis.T, m @ basis
    return SVDFactors(first=first.to(matrix.dtype), last=last.to(matrix.dtype))


def _as_matrix(layer: nn.Module) -> Tensor:
    """The (out, in) matrix of a Linear or an ungrouped 1x1 conv; a clear error otherwise."""
    if isinstance(layer, nn.Linear):
        return layer.weight
    if isinstance(layer, nn.Conv2d):
        if layer.kernel_size != (1, 1) or layer.groups != 1:
            raise ValueError(
                "svd factorizes nn.Linear and ungrouped 1x1 convs; got a "
                f"{layer.kernel_size[0]}x{layer.kernel_size[1]} conv with groups={layer.groups} "
                "(use tucker or cp for kxk convs)"
            )
        return layer.weight[:, :, 0, 0]
    raise TypeError(f"svd factorizes nn.Linear and 1x1 nn.Conv2d; got {type(layer).__name__}")


def build_svd(layer: nn.Linear | nn.Conv2d, rank: int) -> SVDLinear | SVDConv2d:
    """The SVD module for ``layer`` with uninitialised weights (shapes only)."""
    out_f, in_f = _as_matrix(layer).shape
    rank = check_rank(rank, min(out_f, in_f), f"a {out_f}x{in_f} matrix")
    has_bias = layer.bias is not None
    if isinstance(layer, nn.Linear):
        kw = {"device": layer.weight.device, "dtype": layer.weight.dtype}
        first = nn.Linear(in_f, rank, bias=False, **kw)
        return SVDLinear((rank,), first=first, last=nn.Linear(rank, out_f, bias=has_bias, **kw))
    first = conv_like(
        layer,
        in_f,
        rank,
        stride=layer.stride,
        padding=layer.padding,
        dilation=layer.dilation,
        padding_mode=layer.padding_mode,
    )
    return SVDConv2d((rank,), first=first, last=conv_like(layer, rank, out_f, bias=has_bias))


@torch.no_grad()
def svd(
    layer: nn.Linear | nn.Conv2d, rank: int, whitening: Whitening | None = None
) -> SVDLinear | SVDConv2d:
    """Replace-ready rank-``rank`` SVD of an nn.Linear or an ungrouped 1x1 nn.Conv2d.

    The first factor keeps a conv's stride and padding; the last one takes the bias, if any.
    ``whitening`` fits the outputs on data instead of the weights (see :func:`svd_factors`).
    """
    module = build_svd(layer, rank)
    f = svd_factors(_as_matrix(layer), rank, whitening)
    shape = (1, 1) if isinstance(layer, nn.Conv2d) else ()
    module.first.weight.copy_(f.first.reshape(*f.first.shape, *shape))
    module.last.weight.copy_(f.last.reshape(*f.last.shape, *shape))
    copy_bias(layer, module.last)
    return module


class SVDLinear(Factorized):
    """Linear (in->r, no bias) -> Linear (r->out); children first/last."""

    method = "svd"


class SVDConv2d(Factorized):
    """1x1 conv (Cin->r, the stride and padding) -> 1x1 conv (r->Cout); children first/last."""

    method = "svd"


class SVDMethod(Method):
    """Truncated SVD for linear layers and 1x1 convs: rank ``[R]`` from the (out, in) matrix."""

    name = "svd"
    fits_outputs = True
    module_types = (SVDLinear, SVDConv2d)
    auto_priority = 1

    def accepts(self, layer: nn.Module) -> str | None:
        kind = layer_kind(layer)
        return f"{kind}: svd applies to linear and 1x1 layers" if kind == "kxk conv" else None

    def grid(self, layer: nn.Module, points: int) -> RankGrid:
        """Every rank up to min(out, in), walked ``steps // points`` at a time."""
        steps = min(_as_matrix(layer).shape)
        return RankGrid(steps, lambda k: [k], increment=max(1, steps // points))

    def costs(
        self, layer: nn.Module, ranks: Sequence[int], calls: Sequence[Call]
    ) -> tuple[int, int]:
        (r,) = ranks
        out_f, in_f = _as_matrix(layer).shape
        bias = out_f if layer.bias is not None else 0
        if isinstance(layer, nn.Linear):
            rows = sum(numel(c.out) // out_f for c in calls)
        else:
            rows = sum(c.out[2] * c.out[3] for c in calls)
        return rows * r * (in_f + out_f), r * (in_f + out_f) + bias

    def factorize(
        self, layer: nn.Module, ranks: Sequence[int], whitening: Whitening | None = None
    ) -> SVDLinear | SVDConv2d:
        return svd(layer, ranks[0], whitening)

    def build(self, layer: nn.Module, ranks: Sequence[int]) -> SVDLinear | SVDConv2d:
        return build_svd(layer, ranks[0])

    @torch.no_grad()
    def dense(self, module: SVDLinear | SVDConv2d) -> nn.Linear | nn.Conv2d:
        first, last = module.first, module.last
        has_bias = last.bias is not None
        if isinstance(module, SVDLinear):
            layer = nn.Linear(first.in_features, last.out_features, bias=has_bias)
            layer = layer.to(first.weight)
            layer.weight.copy_(last.weight @ first.weight)
        else:
            layer = conv_like(
                first,
                first.in_channels,
                last.out_channels,
                stride=first.stride,
                padding=first.padding,
                dilation=first.dilation,
                padding_mode=first.padding_mode,
                bias=has_bias,
            )
            matrix = last.weight[:, :, 0, 0] @ first.weight[:, :, 0, 0]
            layer.weight.copy_(matrix[:, :, None, None])
        copy_bias(last, layer)
        return layer


register(SVDMethod())
