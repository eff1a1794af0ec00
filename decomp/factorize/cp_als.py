"""CP-ALS for conv kernels, made cheap by their shape: two large channel modes, two tiny spatial.

A kernel W (Cout, Cin, kh, kw) is fit by R rank-one terms, ``W ~ sum_r a_r o b_r o c_r o d_r``,
by alternating least squares (Carroll & Chang 1970; Harshman 1970), with three economies:

- **Compression first** (CANDELINC: Carroll, Pruzansky & Kruskal, Psychometrika 45, 1980; Bro &
  Andersson, Chemometr. Intell. Lab. 42, 1998). The channel modes are projected on their leading
  singular vectors (HOSVD) to a core of R x R x kh x kw at most, ALS runs on the core, the factors
  are expanded back and refined by sweeps on the full kernel. The core sweeps cost a fraction of
  a full sweep and bring the refinement close to its end.
- **MTTKRP through Gram matrices** (Kolda & Bader, SIAM Review 51(3), 2009, section 3.4). No
  Khatri-Rao product of the big modes is formed: a sweep costs two GEMMs of the kernel's size
  times R (W contracted with A over Cout, then with B over Cin), small contractions with the
  (kh*kw, R) Khatri-Rao product of the spatial factors, and R x R solves with the Hadamard
  products of the factors' Gram matrices. Memory is one copy of the kernel and a few
  (Cin or Cout) x kh*kw x R work arrays.
- **Extrapolation between sweeps** (the line search of Bro's thesis, 1998; schedule as in
  tensorly's ``parafac(linesearch=True)``): after sweep k the factors move ``k**(1/p)`` times the
  last step; the move is kept when it lowers the error, and ``p`` grows after 4 failures. The
  error of the moved point comes with the first GEMM of the next sweep, so a kept move is free.

The stopping rule is on the relative error ``||W - W_hat||_F / ||W||_F``: a sweep that lowers it
by less than ``tol`` ends the phase. With ``ridge > 0`` every update minimises the fit plus
``ridge * ||W||^2 * sum_n ||F_n||^2`` (Tikhonov regularisation), which keeps the factors bounded
where plain ALS degenerates into diverging, cancelling terms (a kernel of border rank below R;
Lim & Comon, J. Chemometrics 23, 2009, show the penalised problem always has a solution).

Everything runs in the kernel's dtype (at least float32), the R x R solves in float64.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Callable, Iterator
from contextvars import ContextVar

import torch
from torch import Tensor

from decomp.factorize.linalg import solver_threads, top_eigvecs

Progress = Callable[[int, float], None]
"""``progress(sweep, rel_error)``: called after every ALS sweep (1, 2, ... across the core and
the refinement phase) with the relative error of the full kernel at that point."""

_REPORT_TO: ContextVar[Progress | None] = ContextVar("decomp_cp_sweeps", default=None)


@contextlib.contextmanager
def reporting_sweeps(progress: Progress) -> Iterator[None]:
    """Within the block, every :func:`cp_als` run given no ``progress`` of its own reports its
    sweeps to ``progress``: how a command line shows CP's error as it goes, through
    :func:`decomp.apply` and the workflows, which know nothing of sweeps."""
    token = _REPORT_TO.set(progress)
    try:
        yield
    finally:
        _REPORT_TO.reset(token)


COMPRESS_SHARE = 0.25
"""Compress when the core keeps at most this share of the Cout x Cin channel pairs. On random
and on decaying-spectrum kernels of resnet18's shapes at R = 0.3 x max(Cout, Cin), the core phase
lowered the final error by 0.05 to 2.5% for 20 to 40% more time; on the 64 x 3 x 7 x 7 stem
(share 0.3) it raised it, and a core wider than R (1.5 R, 2 R) did no better than R."""
EXPLICIT_BELOW = 1e-2
"""Relative error under which the residual is summed explicitly: the cheap formula
||W||^2 - 2<W, W_hat> + ||W_hat||^2 cancels to float32 rounding there."""
MAX_FAILS = 4
"""Failed extrapolations before the step exponent grows (tensorly's schedule)."""


class _Kernel:
    """A (Cout, Cin, kh, kw) tensor laid out for the two MTTKRP GEMMs of a sweep."""

    def __init__(self, tensor: Tensor) -> None:
        c_out, c_in, kh, kw = tensor.shape
        self.shape = (c_out, c_in, kh, kw)
        self.by_out = tensor.reshape(c_out, c_in * kh * kw)  # (Cout, Cin*S)
        self.by_in = tensor.reshape(c_out, c_in, kh * kw).transpose(1, 2).reshape(-1, c_in)
        self.by_in = self.by_in.contiguous()  # (Cout*S, Cin)
        self.norm2 = tensor.double().pow(2).sum().item()

    def times_out(self, a: Tensor) -> Tensor:
        """W contracted with ``a`` (Cout, R) over Cout: (Cin, S, R)."""
        return (self.by_out.T @ a).view(self.shape[1], -1, a.shape[1])

    def times_in(self, b: Tensor) -> Tensor:
        """W contracted with ``b`` (Cin, R) over Cin: (Cout, S, R)."""
        return (self.by_in @ b).view(self.shape[0], -1, b.shape[1])

    def residual2(self, factors: list[Tensor]) -> float:
        """||W - [[A, B, C, D]]||_F^2, summed explicitly (one GEMM and one kernel-sized array)."""
        a, b, c, d = factors
        kr = (b[:, None, :] * _spatial(c, d)[None]).reshape(-1, a.shape[1])  # (Cin*S, R)
        return (self.by_out - a @ kr.T).double().pow(2).sum().item()


def _spatial(c: Tensor, d: Tensor) -> Tensor:
    """Khatri-Rao product of the spatial factors: (kh*kw, R), row h*kw + w."""
    return (c[:, None, :] * d[None, :, :]).reshape(-1, c.shape[1])


def _gram(f: Tensor) -> Tensor:
    return (f.T @ f).double()


def _solve(rhs: Tensor, gram: Tensor, ridge: float) -> Tensor:
    """The least-squares update ``rhs @ inv(gram + ridge * I)``; rhs (n, R), gram (R, R) float64."""
    if ridge:
        gram = gram + ridge * torch.eye(gram.shape[0], dtype=gram.dtype)
    chol, info = torch.linalg.cholesky_ex(gram)
    if info.item() == 0:
        out = torch.cholesky_solve(rhs.double().T, chol).T
    else:  # singular normal equations (collinear factors): the minimum-norm update
        out = rhs.double() @ torch.linalg.pinv(gram, hermitian=True)
    return out.to(rhs.dtype)


def _objective(
    kernel: _Kernel, factors: list[Tensor], inner: Tensor, grams: list[Tensor], ridge: float
) -> tuple[float, float]:
    """``(fit + penalty, fit)``: the squared fit error from <W, W_hat> and the factors' Grams
    (summed explicitly where that cancels), and the ridge penalty on top."""
    fit = float(kernel.norm2 - 2 * inner.item() + (grams[0] * grams[1] * grams[2] * grams[3]).sum())
    if fit < EXPLICIT_BELOW**2 * kernel.norm2:
        fit = kernel.residual2(factors)
    penalty = ridge * sum(g.trace().item() for g in grams) if ridge else 0.0
    return fit + penalty, fit


def _sweep(
    kernel: _Kernel, factors: list[Tensor], over_out: Tensor | None, ridge: float
) -> tuple[list[Tensor], tuple[float, float]]:
    """One ALS sweep (B, A, C, D in turn): the new factors and their :func:`_objective`.

    ``over_out`` is ``kernel.times_out(A)`` when the caller has it already.
    """
    a, b, c, d = factors
    kh, kw = kernel.shape[2:]
    ga, gc, gd = _gram(a), _gram(c), _gram(d)
    e = _spatial(c, d)
    if over_out is None:
        over_out = kernel.times_out(a)
    b = _solve((over_out * e).sum(1), ga * gc * gd, ridge)
    gb = _gram(b)
    over_in = kernel.times_in(b)  # (Cout, S, R)
    a = _solve((over_in * e).sum(1), gb * gc * gd, ridge)
    ga = _gram(a)
    z = (over_in * a[:, None, :]).sum(0).view(kh, kw, -1)  # W x A x B: (kh, kw, R)
    c = _solve((z * d[None]).sum(1), ga * gb * gd, ridge)
    gc = _gram(c)
    m_d = (z * c[:, None]).sum(0)  # (kw, R)
    d = _solve(m_d, ga * gb * gc, ridge)
    new = [a, b, c, d]
    inner = (m_d.double() * d.double()).sum()
    return new, _objective(kernel, new, inner, [ga, gb, gc, _gram(d)], ridge)


def _objective_at(
    kernel: _Kernel, factors: list[Tensor], ridge: float
) -> tuple[tuple[float, float], Tensor]:
    """The :func:`_objective` of arbitrary factors, and ``kernel.times_out(A)`` (what the next
    sweep starts with)."""
    a, b, c, d = factors
    over_out = kernel.times_out(a)
    inner = ((over_out * _spatial(c, d)).sum(1).double() * b.double()).sum()
    return _objective(kernel, factors, inner, [_gram(f) for f in factors], ridge), over_out


def _als(
    kernel: _Kernel,
    factors: list[Tensor],
    n_iter_max: int,
    tol: float,
    ridge: float,
    offset: float,
    tick: Callable[[float], None],
) -> tuple[list[Tensor], float]:
    """ALS sweeps with extrapolation until the error falls by less than ``tol`` in a sweep.

    ``offset`` is the squared error outside ``kernel`` (what compression lost, relative to the
    full kernel's unit norm); ``tick(rel_error)`` is told the full kernel's error every sweep.

    Returns:
        The factors and their relative error.
    """
    over_out, power, fails, last, error = None, 2.0, 0, math.inf, math.inf
    for sweep in range(1, n_iter_max + 1):
        new, (objective, fit) = _sweep(kernel, factors, over_out, ridge)
        over_out = None
        if sweep > 1:
            step = sweep ** (1.0 / power)
            trial = [f + step * (f - old) for f, old in zip(new, factors, strict=True)]
            (trial_objective, trial_fit), trial_over_out = _objective_at(kernel, trial, ridge)
            if trial_objective < objective:
                new, objective, fit, over_out = trial, trial_objective, trial_fit, trial_over_out
            else:
                fails += 1
                if fails == MAX_FAILS:
                    power, fails = power + 1.0, 0
        factors = new
        error = math.sqrt(max(offset + fit, 0.0))
        tick(error)
        penalised = math.sqrt(max(offset + objective, 0.0))
        if last - penalised < tol:
            break
        last = penalised
    return factors, error


def _initial_factors(tensor: Tensor, rank: int, generator: torch.Generator) -> list[Tensor]:
    """HOSVD start (as tensorly's ``init='svd'``): each factor holds the leading left singular
    vectors of its unfolding, the first scaled by the singular values; a mode smaller than R is
    padded with uniform [0, 1) columns."""
    factors = []
    for mode, size in enumerate(tensor.shape):
        unfold = tensor.movedim(mode, 0).reshape(size, -1)
        k = min(rank, size)
        vectors, _ = top_eigvecs(unfold @ unfold.T, k)
        if mode == 0:  # times the singular values
            vectors = vectors * (unfold.T @ vectors).norm(dim=0)
        if k < rank:
            pad = torch.rand(size, rank - k, generator=generator, dtype=tensor.dtype)
            vectors = torch.cat([vectors, pad], 1)
        factors.append(vectors)
    return factors


def cp_als(
    tensor: Tensor,
    rank: int,
    *,
    n_iter_max: int = 100,
    tol: float = 1e-6,
    ridge: float = 0.0,
    progress: Progress | None = None,
) -> tuple[list[Tensor], float]:
    """CP factors of a 4-way kernel by compressed, extrapolated ALS.

    Args:
        tensor: (Cout, Cin, kh, kw), float32 or float64.
        rank: R >= 1 (it may exceed every mode's size).
        n_iter_max: most sweeps on the compressed core, and again on the full kernel.
        tol: stop a phase when a sweep lowers the relative error by less than this.
        ridge: Tikhonov weight relative to ||W||^2 (0: plain least squares).
        progress: ``progress(sweep, rel_error)`` after every sweep (see :data:`Progress`);
            default: the one of an enclosing :func:`reporting_sweeps`, if any.

    Returns:
        ``([A (Cout, R), B (Cin, R), C (kh, R), D (kw, R)], rel_error)``, in the tensor's dtype;
        the error is the last sweep's (the fit alone, without the penalty).
    """
    c_out, c_in, _, _ = tensor.shape
    norm = tensor.double().norm().item()
    if norm == 0:  # a zero kernel: zero factors are exact
        return [torch.zeros(size, rank, dtype=tensor.dtype) for size in tensor.shape], 0.0
    w = tensor.detach() / norm  # unit norm: the ridge and the thresholds are scale-free
    generator = torch.Generator().manual_seed(0)
    sweeps = itertools.count(1)
    progress = progress or _REPORT_TO.get()

    def tick(error: float) -> None:
        if progress is not None:
            progress(next(sweeps), error)

    p, q = min(c_out, rank), min(c_in, rank)
    with solver_threads(2.0 * tensor.numel() * rank):  # one MTTKRP GEMM, the largest step
        if p * q <= COMPRESS_SHARE * c_out * c_in:
            core, u_out, u_in = _compress(w, p, q)
            small = _Kernel(core)
            factors = _initial_factors(core, rank, generator)
            factors, _ = _als(small, factors, n_iter_max, tol, ridge, 1.0 - small.norm2, tick)
            factors = [u_out @ factors[0], u_in @ factors[1], *factors[2:]]
        else:
            factors = _initial_factors(w, rank, generator)
        factors, error = _als(_Kernel(w), factors, n_iter_max, tol, ridge, 0.0, tick)
    factors[0] = factors[0] * norm
    return [f.to(tensor.dtype) for f in factors], error


def _compress(w: Tensor, p: int, q: int) -> tuple[Tensor, Tensor, Tensor]:
    """HOSVD of the channel modes: core (p, q, kh, kw), U_out (Cout, p), U_in (Cin, q)."""
    unfold_out = w.reshape(w.shape[0], -1)
    unfold_in = w.transpose(0, 1).reshape(w.shape[1], -1)
    u_out, _ = top_eigvecs(unfold_out @ unfold_out.T, p)
    u_in, _ = top_eigvecs(unfold_in @ unfold_in.T, q)
    core = (u_out.T @ unfold_out).reshape(p, w.shape[1], -1)  # (p, Cin, S)
    core = torch.einsum("pis,iq->pqs", core, u_in).reshape(p, q, *w.shape[2:])
    return core.contiguous(), u_out, u_in
