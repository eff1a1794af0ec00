"""The one place decomp touches tensorly, so that its next API change has one place to land.

Everything runs inside ``tl.backend_context("pytorch")``: tensorly's global backend is never
changed (tensorly-torch sets it on import; we do not rely on that either way).
"""

from __future__ import annotations

import warnings

import tensorly as tl
from tensorly.decomposition import parafac as _parafac
from tensorly.decomposition import partial_tucker as _partial_tucker
from torch import Tensor


def parafac(
    tensor: Tensor,
    rank: int,
    *,
    n_iter_max: int = 100,
    tol: float = 1e-8,
    l2_reg: float = 0.0,
    random_state: int = 0,
) -> tuple[Tensor, list[Tensor]]:
    """CP-ALS. Returns ``(weights (rank,), [factor (dim_k, rank) for each mode])``."""
    with tl.backend_context("pytorch"), warnings.catch_warnings():
        # a rank above a mode's size is fine for CP; tensorly warns while it pads the SVD start
        warnings.filterwarnings("ignore", message="Trying to compute SVD with n_eigenvecs")
        cp = _parafac(
            tensor,
            rank,
            n_iter_max=n_iter_max,
            init="svd",
            tol=tol,
            l2_reg=l2_reg,
            random_state=random_state,
        )
    weights, factors = cp
    return weights, list(factors)


def partial_tucker(
    tensor: Tensor, ranks: list[int], modes: list[int], *, n_iter_max: int = 100, tol: float = 1e-4
) -> tuple[Tensor, list[Tensor]]:
    """tensorly's HOOI over ``modes``. Returns ``(core, [factor (dim_k, rank_k) per mode])``."""
    with tl.backend_context("pytorch"):
        (core, factors), _ = _partial_tucker(
            tensor, rank=ranks, modes=modes, n_iter_max=n_iter_max, init="svd", tol=tol
        )
    return core, list(factors)
