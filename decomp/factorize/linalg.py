"""The small linear algebra behind the factorizers and the rank choices.

Every solve here works on a Gram matrix (channels x channels), never on a full SVD: a
4096 x 25088 layer costs one 4096 x 4096 eigendecomposition.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor

SOLVER_THREADS: int | None = 1
"""Intra-op threads for the solves run under :func:`solver_threads` (None: the caller's setting).

Measured on the 2-core machine this project is built on, shared with other jobs (``make
bench-cp``, section "Thread policy" of benchmarks/results/cp_speed.md): with two torch threads
every eigensolve from 256 x 256 to 4096 x 4096 and every CP-ALS of a 64- to 512-channel kernel
ran 2 to 160x slower than with one, with or without a competing CPU-bound process: each of the
many small parallel regions of a solve waits at its barrier for a thread the scheduler has lent
to someone else. On a dedicated many-core machine set it to None to keep the caller's threads."""

SMALL_SOLVE_FLOPS = 3e11
"""Solves up to about this many flops are "small" and run on :data:`SOLVER_THREADS`: the largest
measured, a 4096 x 4096 eigh (about 4 * 4096^3 = 2.7e11), still ran 5x faster on one thread
than on two. Larger solves, never measured here, keep the caller's setting."""


@contextlib.contextmanager
def solver_threads(flops: float) -> Iterator[int]:
    """Run a solve of about ``flops`` floating-point operations with the policy's thread count.

    A small solve (see :data:`SMALL_SOLVE_FLOPS`) runs on :data:`SOLVER_THREADS` threads, never
    more than the caller had; the caller's ``torch.get_num_threads()`` is restored on exit (the
    setting is process-wide, as torch's is). Nested uses keep the outer choice.

    Yields:
        The thread count in force inside the block.
    """
    before = torch.get_num_threads()
    small = SOLVER_THREADS is not None and flops <= SMALL_SOLVE_FLOPS
    if not small or SOLVER_THREADS >= before:
        yield before
        return
    torch.set_num_threads(SOLVER_THREADS)
    try:
        yield SOLVER_THREADS
    finally:
        torch.set_num_threads(before)


def _eigh(gram: Tensor) -> tuple[Tensor, Tensor]:
    """``torch.linalg.eigh`` under :func:`solver_threads` (about 4 n^3 flops for n x n)."""
    with solver_threads(4.0 * gram.shape[-1] ** 3):
        return torch.linalg.eigh(gram)


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
    values, vectors = _eigh(gram.double())
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
    values, vectors = _eigh(gram)
    return vectors[:, -rank:].flip(-1), values[-rank:].double().sum()
