"""Empirical variational Bayesian matrix factorization (EVBMF) rank selection.

For an ``L x M`` matrix ``Y = B A^T + E`` (``L <= M`` after transposing) with Gaussian noise of
variance ``sigma2``, the global EVB solution keeps exactly the singular values ``gamma_h`` above

    gamma_evb = sqrt(M * sigma2 * x_bar),   x_bar = (1 + tau) * (1 + alpha / tau),   alpha = L / M,

where ``tau = tau(alpha)`` is the unique zero of ``Phi(tau) + Phi(tau / alpha)`` with
``Phi(z) = log(1 + z) / z - 1/2`` (Nakajima, Sugiyama, Babacan, Tomioka, "Global analytic solution
of fully-observed variational Bayesian matrix factorization", JMLR 14, 2013). With ``z = 2.5129``
the zero of ``Phi``, ``z sqrt(alpha) <= tau <= z`` (equal at ``alpha = 1``); common ports use the
lower end ``z sqrt(alpha)`` as ``tau``, which lowers the threshold when ``alpha < 1``; we solve.
The threshold ``x_bar`` is where ``psi_1`` below crosses zero, i.e. where keeping a component starts
to lower the free energy.

When ``sigma2`` is unknown it is the global minimiser of the EVB free energy (Nakajima, Tomioka,
Sugiyama, Babacan, "Condition for perfect dimensionality recovery by variational Bayesian PCA",
JMLR 16, 2015), up to terms that do not depend on ``sigma2``:

    Omega(sigma2) = sum_h [x_h + log sigma2] + sum_{h: x_h > x_bar} psi_1(x_h),
    x_h = gamma_h^2 / (M sigma2),
    psi_1(x) = log(t + 1) + alpha log(t / alpha + 1) - t,
    t = t(x) = (x - (1 + alpha) + sqrt((x - (1 + alpha))^2 - 4 alpha)) / 2,

searched within the paper's bounds ``[sigma2_lo, sigma2_hi]`` (see ``_sigma2_bounds``).

Everything runs on the spectrum rescaled so that ``sum gamma_h^2 / (L M) = 1``, so the rank does not
depend on the scale of the weights; ``sigma2`` and ``threshold`` are reported in the input's scale.

The noise-model check (``checked_rank``). With ``sigma2`` estimated, EVB always finds *some*
noise level, and a spectrum with no noise in it at all (trained weights) is still split into
"signal" and "noise": a flat spectrum becomes all noise (rank 0), a smoothly decaying one keeps
its few largest values (EVB ranks 0 to 16 on the 16- to 320-channel 1x1 convs of a pretrained
EfficientNet-Lite0, 19 on its 1000x1280 classifier), and EVB can never keep more than about
``L / (1 + alpha)`` components (half of a square matrix). So the values EVB discards are tested
for being what its model says they are, the singular values of an ``L' x M'`` Gaussian matrix
(``L' = L - r``, ``M' = M - r`` once ``r`` components are removed), with John's sphericity
statistic in the high-dimensional form of Ledoit and Wolf ("Some hypothesis tests for the
covariance matrix when the dimension is large compared to the sample size", Annals of Statistics
30(4), 2002):

    U = L' sum x^2 / (sum x)^2 - 1,   x = gamma^2 of the discarded values,
    z = (M' U - L' - 1) / 2,           about N(0, 1) for noise.

``U`` is the squared coefficient of variation of ``x``: it does not depend on the scale or on
``sigma2``. Simulated on Gaussian matrices from 2x2 to 100x300 here (400 to 3000 draws each),
``z`` has mean -0.84 to 0.07 and standard deviation 0.30 to 1.06, ``P(z > 3.5)`` at most 0.5%
(2x50, 6x50) and ``P(z < -3.5)`` 0 in every draw.
``z < -NOISE_Z``: the discarded values are flatter than any noise of that shape (a plateau, not a
bulk), so they are signal and ``checked_rank`` is ``L``. ``z > NOISE_Z``: they are more spread
than noise, so EVB stopped too early; the rank is raised one at a time until the rest passes (or
to ``L`` if the rest turns out flatter than noise on the way), unless EVB kept nothing: a
spectrum that is not noise and has no value standing out is a spread-out signal, and
``checked_rank`` is ``L`` (MTCNN's PNet kept the original's decision on half of its inputs when
its second conv, EVB rank 0 and ``z = 4.6``, was cut to ranks (8, 8) of (16, 10), and on 86% at
(12, 8)). ``checked_rank >= rank``; with
fewer than two values left the check cannot reject. With ``sigma2`` given there is nothing to
check (``checked_rank == rank``). ``rank`` stays EVB's own answer, which the MACs budget of
``decomp.plan`` uses as a soft prior; the vbmf rank strategies use ``checked_rank``.
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.linalg
from scipy.optimize import brentq, minimize_scalar

try:  # installed with scikit-learn; only a speed-up, so optional
    from threadpoolctl import threadpool_limits
except ImportError:  # pragma: no cover
    threadpool_limits = None

__all__ = [
    "NOISE_Z",
    "EVBMFResult",
    "as_spectrum",
    "evb_tau",
    "evbmf",
    "evbmf_spectrum",
    "noise_z_scores",
    "singular_values",
]

_GRID_POINTS = 256  # coarse log-spaced search for the global minimum before the bounded refinement
_LOG_XATOL = 1e-10  # tolerance of the refinement, in log(sigma2)
_EPS = float(np.finfo(np.float64).eps)
_SIGMA2_FLOOR = _EPS**2  # lower end of the search (relative to the mean square) for low-rank input
NOISE_Z = 3.5
"""Discarded singular values whose sphericity score ``|z|`` exceeds this are not noise-like."""


@dataclass(frozen=True)
class EVBMFResult:
    """Outcome of EVBMF on one matrix.

    Attributes:
        rank: number of singular values kept, in ``[0, L]``.
        sigma2: noise variance (estimated, or the one given), in the input's scale.
        singular_values: shape ``(L,)``, float64, descending (zero-padded if fewer were given).
        threshold: singular values strictly above it are kept, in the input's scale.
        shape: ``(L, M)`` with ``L <= M``.
        checked_rank: ``rank`` raised until the values left look like noise (module docstring),
            in ``[rank, L]``.
        noise_z: sphericity score of the values EVB discards; ``|noise_z| <= NOISE_Z`` means
            they look like noise. None when ``sigma2`` was given or the matrix is zero.
    """

    rank: int
    sigma2: float
    singular_values: np.ndarray
    threshold: float
    shape: tuple[int, int]
    checked_rank: int
    noise_z: float | None

    @property
    def noise_like(self) -> bool:
        """Whether what EVB discards looks like noise, so that its split can be trusted."""
        return self.checked_rank == self.rank


def _phi(z: float) -> float:
    """``Phi(z) = log(1 + z) / z - 1/2``, decreasing from 1/2 at 0 to -1/2 at infinity."""
    return math.log1p(z) / z - 0.5


@functools.lru_cache(maxsize=256)
def evb_tau(alpha: float) -> float:
    """Return ``tau(alpha)``, the zero of ``Phi(tau) + Phi(tau / alpha)`` (JMLR 14, 2013).

    Args:
        alpha: aspect ratio ``L / M`` in ``(0, 1]``.

    Returns:
        ``tau``, with ``2.5129 sqrt(alpha) <= tau <= 2.5129`` (about).
    """
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha must be in (0, 1]; got {alpha!r}")

    def xi(tau: float) -> float:
        return _phi(tau) + _phi(tau / alpha)

    lo, hi = 0.5 * math.sqrt(alpha), 3.0 * math.sqrt(alpha)
    while xi(lo) <= 0.0:  # Xi decreases monotonically; widen the bracket until it changes sign
        lo *= 0.5
    while xi(hi) >= 0.0:
        hi *= 2.0
    return float(brentq(xi, lo, hi, xtol=1e-14, rtol=1e-14))


def _x_bar(alpha: float) -> float:
    """Threshold on ``x = gamma^2 / (M sigma2)``: ``(1 + tau)(1 + alpha / tau)``."""
    tau = evb_tau(alpha)
    return (1.0 + tau) * (1.0 + alpha / tau)


def as_spectrum(s: Any) -> np.ndarray:
    """Return singular values as a 1-D float64 numpy array sorted in descending order.

    Args:
        s: shape ``(H,)``, numpy array, torch tensor (any float dtype, any device) or sequence.

    Raises:
        ValueError: if ``s`` is not 1-D or holds a non-finite value.
    """
    arr = _to_numpy(s)
    if arr.ndim != 1:
        raise ValueError(f"singular values must be 1-D; got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError("singular values must be finite; got NaN or inf")
    return np.sort(np.abs(arr))[::-1].copy()


def _to_numpy(x: Any) -> np.ndarray:
    """Move a torch tensor or array-like to a CPU float64 numpy array."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch.Tensor, without importing torch
        import torch

        return x.detach().to(device="cpu", dtype=torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def _check_shape(shape: tuple[int, int]) -> tuple[int, int]:
    """Return ``(L, M)`` with ``L <= M`` from a 2-D shape; raise ValueError if empty."""
    if len(shape) != 2:
        raise ValueError(f"shape must be (rows, cols); got {tuple(shape)!r}")
    small, large = sorted(int(d) for d in shape)
    if small < 1:
        raise ValueError(f"shape must have positive sizes; got {tuple(shape)!r}")
    return small, large


def _tau_of_x(x: np.ndarray, alpha: float) -> np.ndarray:
    """``t(x)``, the larger root of ``t^2 - (x - 1 - alpha) t + alpha = 0`` (for ``x > x_bar``)."""
    b = x - (1.0 + alpha)
    return 0.5 * (b + np.sqrt(b * b - 4.0 * alpha))


def _free_energy(log_s2: np.ndarray, s2: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """EVB free energy ``Omega`` (up to constants) at each ``log sigma2``.

    Args:
        log_s2: shape ``(G,)``, candidate ``log sigma2`` values.
        s2: shape ``(L,)``, squared singular values.
        shape: ``(L, M)`` with ``L <= M``.

    Returns:
        shape ``(G,)``, the objective at each candidate.
    """
    length, m = shape
    alpha = length / m
    x_bar = _x_bar(alpha)
    x = s2[None, :] * np.exp(-log_s2)[:, None] / m
    kept = x > x_bar
    t = _tau_of_x(np.where(kept, x, x_bar + 1.0), alpha)
    psi1 = np.log1p(t) + alpha * np.log1p(t / alpha) - t
    return length * log_s2 + x.sum(axis=1) + np.where(kept, psi1, 0.0).sum(axis=1)


def _sigma2_bounds(s2: np.ndarray, shape: tuple[int, int]) -> tuple[float, float]:
    """Interval that holds the EVB noise variance (JMLR 16, 2015).

    Upper: ``sum_h gamma_h^2 / (L M)``. Lower: ``max(gamma_{Hb+1}^2 / (M x_bar),
    sum_{h > Hb} gamma_h^2 / (M (L - Hb)))`` with ``Hb = ceil(L / (1 + alpha)) - 1``, the most
    components EVB can keep. ``ceil`` (not ``floor``) and the exact ``x_bar`` give the looser
    of the published variants; the grid search below makes a looser interval harmless.

    Args:
        s2: shape ``(L,)``, squared singular values, descending.
        shape: ``(L, M)`` with ``L <= M``.
    """
    length, m = shape
    alpha = length / m
    h_bar = math.ceil(length / (1.0 + alpha)) - 1  # 0 <= h_bar <= L - 1
    upper = float(s2.sum()) / (length * m)
    lower = max(s2[h_bar] / (m * _x_bar(alpha)), float(s2[h_bar:].mean()) / m)
    return min(lower, upper), upper


def _estimate_log_sigma2(s2: np.ndarray, shape: tuple[int, int]) -> float:
    """Global minimiser of the free energy over ``log sigma2``.

    The objective can have several local minima, so a log-spaced grid over the paper's bounds
    picks the best few basins and a bounded Brent search refines each.
    """
    lower, upper = _sigma2_bounds(s2, shape)
    lo, hi = math.log(max(lower, upper * _SIGMA2_FLOOR)), math.log(upper)
    if hi - lo <= _LOG_XATOL:
        return hi
    grid = np.linspace(lo, hi, _GRID_POINTS)
    values = _free_energy(grid, s2, shape)
    candidates = [_refine(grid, i, s2, shape) for i in _basins(values)]
    energies = _free_energy(np.array(candidates), s2, shape)
    return float(candidates[int(np.argmin(energies))])


def _basins(values: np.ndarray, keep: int = 3) -> list[int]:
    """Indices of the ``keep`` lowest local minima of a sampled curve (shape ``(G,)``)."""
    padded = np.concatenate([[np.inf], values, [np.inf]])
    is_min = (values <= padded[:-2]) & (values <= padded[2:])
    minima = np.flatnonzero(is_min)
    return [int(i) for i in minima[np.argsort(values[minima])][:keep]]


def _refine(grid: np.ndarray, i: int, s2: np.ndarray, shape: tuple[int, int]) -> float:
    """Bounded Brent search between the grid neighbours of ``grid[i]``; keeps the better point."""
    a, b = grid[max(i - 1, 0)], grid[min(i + 1, grid.size - 1)]
    res = minimize_scalar(
        lambda u: float(_free_energy(np.array([u]), s2, shape)[0]),
        bounds=(a, b),
        method="bounded",
        options={"xatol": _LOG_XATOL},
    )
    pair = np.array([grid[i], float(res.x)])
    return float(pair[int(np.argmin(_free_energy(pair, s2, shape)))])


def evbmf_spectrum(s: Any, shape: tuple[int, int], sigma2: float | None = None) -> EVBMFResult:
    """EVBMF rank of a matrix from its singular values alone.

    Args:
        s: shape ``(H,)`` with ``H <= min(shape)``, singular values in any order (numpy or torch);
            missing ones (``H < min(shape)``) are taken as zero.
        shape: the matrix shape, ``(L, M)`` or ``(M, L)``: the result is the same.
        sigma2: known noise variance; ``None`` estimates it (empirical Bayes).

    Returns:
        The EVBMF result; ``rank`` is in ``[0, min(shape)]``.

    Raises:
        ValueError: on a bad shape, too many or non-finite singular values, or negative sigma2.
    """
    dims = _check_shape(shape)
    values = as_spectrum(s)
    if values.size > dims[0]:
        raise ValueError(
            f"got {values.size} singular values for shape {tuple(shape)}; max {dims[0]}"
        )
    values = np.concatenate([values, np.zeros(dims[0] - values.size)])
    values.flags.writeable = False
    if sigma2 is not None:
        return _with_known_sigma2(values, dims, sigma2)
    return _with_estimated_sigma2(values, dims)


def _with_estimated_sigma2(values: np.ndarray, dims: tuple[int, int]) -> EVBMFResult:
    """EVB with the noise variance estimated, on the spectrum rescaled to unit mean square."""
    if values[0] == 0.0:
        return EVBMFResult(0, 0.0, values, 0.0, dims, 0, None)
    relative = values / values[0]  # a new, writable array
    relative[relative <= max(dims) * _EPS] = 0.0  # rounding noise of an exactly low-rank matrix
    scale = values[0] * math.sqrt(float(np.sum(relative**2)) / (dims[0] * dims[1]))
    scaled = relative * (values[0] / scale)  # now sum(scaled**2) / (L M) == 1
    sigma2_scaled = math.exp(_estimate_log_sigma2(scaled**2, dims))
    threshold = math.sqrt(dims[1] * sigma2_scaled * _x_bar(dims[0] / dims[1]))
    rank = int(np.count_nonzero(scaled > threshold))
    scores = noise_z_scores(relative, dims)
    sigma2 = float(sigma2_scaled * scale**2)
    return EVBMFResult(
        rank,
        sigma2,
        values,
        float(threshold * scale),
        dims,
        _checked_rank(scores, rank),
        float(scores[rank]) if rank < dims[0] else None,
    )


def noise_z_scores(s: Any, shape: tuple[int, int]) -> np.ndarray:
    """Sphericity score of the values left after removing the ``r`` largest, for every ``r``.

    Args:
        s: shape ``(L,)``, singular values in any order (zero-padded to ``min(shape)``).
        shape: the matrix shape, ``(L, M)`` or ``(M, L)``.

    Returns:
        shape ``(L,)``: entry ``r`` is ``z = ((M - r) U - (L - r) - 1) / 2`` of the ``L - r``
        smallest values (Ledoit and Wolf 2002, see the module docstring), about N(0, 1) when they
        are the singular values of Gaussian noise; 0 where they are all zero.
    """
    length, m = _check_shape(shape)
    values = as_spectrum(s)
    if values.size > length:
        raise ValueError(f"got {values.size} singular values for shape {tuple(shape)}")
    x = np.concatenate([values, np.zeros(length - values.size)]) ** 2
    x = x / x[0] if x[0] > 0 else x  # scale-free, and no overflow in x**2
    left = np.arange(length, 0, -1)  # L - r values left
    total = np.cumsum(x[::-1])[::-1]
    squares = np.cumsum((x * x)[::-1])[::-1]
    with np.errstate(invalid="ignore", divide="ignore"):
        spread = left * squares / total**2 - 1.0
    z = ((m - np.arange(length)) * spread - left - 1.0) / 2.0
    return np.where(total > 0, z, 0.0)


def _checked_rank(scores: np.ndarray, evb_rank: int) -> int:
    """EVB's rank, raised until the values left pass the check (see the module docstring)."""
    length = scores.size
    if evb_rank == 0 and abs(scores[0]) > NOISE_Z:
        return length  # not noise, and no value stands out: a spread-out signal
    for r in range(evb_rank, length):
        if scores[r] < -NOISE_Z:
            return length  # flatter than noise: a plateau of signal
        if scores[r] <= NOISE_Z:
            return r
    return length


def _with_known_sigma2(values: np.ndarray, dims: tuple[int, int], sigma2: float) -> EVBMFResult:
    """EVB threshold ``sqrt(M sigma2 x_bar)`` for a given noise variance."""
    sigma2 = float(sigma2)
    if not (math.isfinite(sigma2) and sigma2 >= 0.0):
        raise ValueError(f"sigma2 must be finite and >= 0; got {sigma2!r}")
    threshold = math.sqrt(dims[1] * sigma2 * _x_bar(dims[0] / dims[1]))
    rank = int(np.count_nonzero(values > threshold))
    return EVBMFResult(rank, sigma2, values, threshold, dims, rank, None)


def singular_values(y: Any) -> np.ndarray:
    """Singular values of a 2-D matrix, descending, without computing singular vectors.

    A very wide (or tall) matrix is first reduced to its ``L x L`` triangular QR factor, which has
    the same singular values and is cheaper to bidiagonalise. BLAS runs on one thread here: at
    layer sizes LAPACK's SVD gains little from threads, and threaded OpenBLAS slows down badly
    when the cores are shared (512x4608 on a busy 2-core machine: 0.2 s on one thread, 1-3 s on
    two).

    Args:
        y: shape ``(rows, cols)``, numpy array or torch tensor.

    Returns:
        shape ``(min(rows, cols),)``, float64.
    """
    mat = _to_numpy(y)
    if mat.ndim != 2:
        raise ValueError(f"EVBMF needs a 2-D matrix; got shape {mat.shape}")
    _check_shape(mat.shape)
    if not np.all(np.isfinite(mat)):
        raise ValueError("matrix must be finite; got NaN or inf")
    if mat.shape[0] > mat.shape[1]:
        mat = mat.T
    with _one_blas_thread():
        if mat.shape[1] >= 2 * mat.shape[0]:
            mat = scipy.linalg.qr(mat.T, mode="r", check_finite=False)[0][: mat.shape[0]]
        return scipy.linalg.svdvals(mat, check_finite=False)


def _one_blas_thread() -> contextlib.AbstractContextManager:
    """Limit BLAS/LAPACK to one thread if threadpoolctl is available."""
    if threadpool_limits is None:  # pragma: no cover
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def evbmf(y: Any, sigma2: float | None = None) -> EVBMFResult:
    """EVBMF rank of a 2-D matrix (Nakajima et al., JMLR 14, 2013).

    Args:
        y: shape ``(rows, cols)``, numpy array or torch tensor of any float dtype on any device
            (copied to CPU float64). ``y`` and ``y.T`` give the same result.
        sigma2: known noise variance; ``None`` estimates it.

    Returns:
        The EVBMF result; ``rank`` is in ``[0, min(rows, cols)]``.
    """
    shape = tuple(getattr(y, "shape", np.shape(y)))
    return evbmf_spectrum(singular_values(y), shape, sigma2=sigma2)
