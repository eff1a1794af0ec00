"""The small linear algebra behind the factorizers and the rank choices.

Every solve here works on a Gram matrix (channels x channels), never on a full SVD: a
4096 x 25088 layer costs one 4096 x 4096 eigendecomposition.
"""

from __future__ import annotations

import torch
from torch import Tensor


def gram_eigh(matrix: Tensor) -> tuple[Tensor, Tensor, bool]:
    """Eigendecomposition of the smaller Gram matrix of ``matrix`` (m, n), largest first.

    The product runs in float32 (or the matrix's wider dtype), the eigensolver in float64. Never
    builds U and V of a full SVD, so a 4096 x 25088 layer costs one 4096 x 4096 eigh.

    Returns:
        ``(values, vectors, left)``: eigenvalues (k,) clipped at 0 (squared singular values),
        eigenvectors (k, k) as columns, and whether they are left vectors (k = m <= n).
    """
    m = matrix.detach()
    if m.dtype not in (torch.float32, torch.float64):
        m = m.float()
    left = m.shape[0] <= m.shape[1]
    gram = m @ m.T if left else m.T @ m
    values, vectors = torch.linalg.eigh(gram.double())
    values, vectors = values.flip(0), vectors.flip(1)
    floor = values[0].clamp_min(0) * max(m.shape) * torch.finfo(m.dtype).eps
    return torch.where(values > floor, values, torch.zeros_like(values)), vectors, left


def singular_values(matrix: Tensor) -> Tensor:
    """Singular values of ``matrix``, descending, in float64 (from :func:`gram_eigh`)."""
    return gram_eigh(matrix)[0].sqrt()


def top_eigvecs(gram: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Leading ``rank`` eigenvectors (columns) of a PSD matrix and the sum of their eigenvalues.

    The eigendecomposition runs in the Gram's dtype (float32 for float32 kernels: the kept
    subspace is accurate to about 1e-6, far below the changes the stopping rule looks at, and it
    is twice as fast as float64 on the largest layers); the sum is returned in float64.
    """
    values, vectors = torch.linalg.eigh(gram)
    return vectors[:, -rank:].flip(-1), values[-rank:].double().sum()
